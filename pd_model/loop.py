"""The optimisation loop every training shares, on `accelerate`: one step, its resume, its checkpoints.

`run` is the driver: an `Accelerator` for the training, resume from the newest checkpoint, then
`Optimiser.step` per step, a callback (validation grids) and a checkpoint every N steps, each
step's loss, learning rate, gradient norm and samples/s to the run's tracker (`pd_model.tracking`,
main process only). Every random choice of a step comes from generators seeded by (seed, step), so
weights + optimizer + EMA + step number are a run's whole state (with the global RNGs', saved
too), and a run killed at any step resumes to bitwise the same weights.

The Accelerator places the trained modules, wraps them in DistributedDataParallel on several
processes (`prepare`), lets all but a step's last micro-batch accumulate without an all-reduce
(`no_sync`), autocasts, and under fp16 scales the loss, unscales before clipping and skips steps
with an inf (`backward`, `clip_grad_norm_`, its optimizer). One thing is the project's own: DDP
averages gradients over processes, but each process's loss here is already its share of the
global-batch mean, so a communication hook sums them instead; that is what makes the weights
independent of the process count.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, GradientAccumulationPlugin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel

from pd_core.progress import Progress
from pd_model import names
from pd_model.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from pd_model.precision import Precision
from pd_model.tracking import Tracking, accelerator_args, open_run

StepLoss = Callable[[int, range], torch.Tensor]  # (step, this micro-batch's sample indices) -> mean loss
BUCKET_MB = 25  # DDP's gradient buckets: each is all-reduced as soon as backward has filled it
DATA_PARALLEL = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


@dataclass(frozen=True)
class Optim:
    """AdamW, warm-up, clipping, EMA, and how one step's global batch is split and computed."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    ema_decay: float = 0.0
    grad_accum_steps: int = 1
    mixed_precision: Precision = "no"  # accelerate's: "no" (fp32), "bf16", "fp16"

    @classmethod
    def of(cls, cfg, steps: int, mixed_precision: Precision) -> "Optim":
        """The optimisation settings of a training config (`train` or `base`): the fields both name
        alike, and the defaults here for those a config does not have (the base has no warm-up)."""
        names = {"batch_size": "batch_size", "lr": "learning_rate", "weight_decay": "weight_decay",
                 "grad_clip": "grad_clip", "warmup_steps": "warmup_steps", "ema_decay": "ema_decay",
                 "grad_accum_steps": "grad_accum_steps"}
        given = {ours: getattr(cfg, theirs) for ours, theirs in names.items() if hasattr(cfg, theirs)}
        return cls(steps=steps, mixed_precision=mixed_precision, **given)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often `run` checkpoints; the newest checkpoint there is resumed from.

    `modules` are everything the run trains (the ControlNet, a decoder copy, the base's UNet and text
    encoder), saved and restored together under their names."""

    root: Path
    modules: dict[str, torch.nn.Module]
    every: int
    keep_last: int = 2
    model: torch.nn.ModuleDict = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "model", torch.nn.ModuleDict(self.modules))


def world() -> tuple[int, int]:
    """(rank, number of processes) of the torch.distributed group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def micro_batches(batch_size: int, accum: int) -> list[range]:
    """This process's slices of the global batch: a contiguous 1/world share, cut into `accum` pieces."""
    rank, n = world()
    per = batch_size // n
    micro = per // accum
    return [range(rank * per + m * micro, rank * per + (m + 1) * micro) for m in range(accum)]


def accelerator(device: torch.device, precision: Precision, **tracking) -> Accelerator:
    """The Accelerator of one training on `device` in `precision` (`tracking`: `accelerator_args`).

    The job decides what changes weights, never the launcher: gradient accumulation stays 1 (the
    loop cuts its own micro-batches) and dynamo off, whatever `accelerate config` exported, and a
    launcher that moves the training to another device or to FSDP / DeepSpeed is refused."""
    # accelerate keeps one device and precision per process; the trainings of one process (the
    # base on the CPU, then each ControlNet) may differ in both, so each starts from a fresh state.
    AcceleratorState._reset_state(reset_partial_state=True)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", precision)
    if launched != precision:
        warnings.warn(f"accelerate's mixed_precision={launched!r} is not used: the training's mixed_precision "
                      f"setting, part of its key, resolves to {precision!r}")
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=precision, dynamo_backend="no",
                      gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
                      step_scheduler_with_optimizer=False,  # one scheduler step per global step, any process count
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False, bucket_cap_mb=BUCKET_MB)],
                      **tracking)
    if acc.distributed_type not in DATA_PARALLEL:
        raise ValueError(f"accelerate is configured for {acc.distributed_type.value}, but training here is data-parallel "
                         f"only (DDP); rerun `accelerate config` choosing multi-GPU or no distribution, or use torchrun")
    if acc.device.type != device.type:
        raise ValueError(f"accelerate put this training on {acc.device.type} (`accelerate launch --cpu`?) but its "
                         f"device setting says {device.type}; the setting decides: drop --cpu or set device=cpu")
    return acc


def _sum_hook(_state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP communication hook: sum a `dist.GradBucket` over processes (DDP's default averages; each
    process's loss is already its share of the global-batch mean)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


class StepModule(torch.nn.Module):
    """A step's loss as a module over the trained parameters: what the Accelerator prepares (and DDP
    wraps), so that each gradient bucket is all-reduced as soon as backward has filled it,
    overlapping the rest of backward."""

    def __init__(self, params: list[torch.nn.Parameter], step_loss: StepLoss):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)  # the same Parameter objects, not copies
        self.step_loss = step_loss

    def forward(self, step: int, idx: range) -> torch.Tensor:
        return self.step_loss(step, idx)


class StepStats(NamedTuple):
    """One step: its global-batch loss, the learning rate it used, the gradient norm before clipping."""

    loss: float
    lr: float
    grad_norm: float


def warmup_schedule(opt: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then constant: step s trains at lr * min(1, (s + 1) / warmup_steps).

    diffusers' 'constant_with_warmup' is s / warmup_steps, whose first step trains at lr 0 (a step of
    Adam moments and no update); counting its steps from 1 (last_epoch=0, which needs the
    optimizer's `initial_lr`) skips that step and gives the factors above exactly."""
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler("constant_with_warmup", opt, num_warmup_steps=warmup_steps, last_epoch=0)


class Optimiser:
    """AdamW + warm-up schedule + optional EMA over `params`, prepared by `acc`, and the losses so far.

    Each process backpropagates sum-over-its-samples / batch_size; summing over processes gives the
    gradient of the global mean, whatever the number of processes and micro-batches."""

    def __init__(self, acc: Accelerator, params: list[torch.nn.Parameter], o: Optim, step_loss: StepLoss):
        self.acc, self.params, self.o = acc, params, o
        # Mixed precision takes the fused AdamW kernel (one pass over each parameter's state); fp32 keeps
        # the default implementation, so its weights stay bitwise those of every earlier fp32 run.
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=o.mixed_precision != "no" or None)
        self.module, self.opt, self.sched = acc.prepare(StepModule(params, step_loss), opt,
                                                        warmup_schedule(opt, o.warmup_steps))
        if isinstance(self.module, DistributedDataParallel):
            self.module.register_comm_hook(None, _sum_hook)
        self.ema = EMAModel(params, decay=o.ema_decay) if o.ema_decay > 0 else None
        self.losses: list[float] = []

    def step(self, step: int, slices: list[range]) -> StepStats:
        """One optimizer step on the global batch of `step` (not applied if its loss is not finite)."""
        o, acc, lr = self.o, self.acc, self.sched.get_last_lr()[0]
        self.opt.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for m, idx in enumerate(slices):
            # All but the last micro-batch accumulate locally; the last one's backward all-reduces the sum.
            with nullcontext() if m == len(slices) - 1 else acc.no_sync(self.module):
                with acc.autocast():
                    part = self.module(step, idx) * (len(idx) / o.batch_size)
                acc.backward(part)
            loss = loss + part.detach().float().cpu()
        loss = acc.reduce(loss.to(acc.device), "sum").cpu()
        if not math.isfinite(loss.item()):
            return StepStats(loss.item(), lr, math.nan)
        grad_norm = acc.clip_grad_norm_(self.params, o.grad_clip)  # fp16: unscaled first, the true gradients clipped
        self.opt.step()  # fp16: skipped when a gradient is inf/nan; the scale then shrinks
        self.sched.step()
        if self.ema is not None:
            self.ema.step(self.params)
        self.losses.append(loss.item())
        return StepStats(loss.item(), lr, grad_norm.item())

    @contextmanager
    def shipped_weights(self):
        """The EMA weights in place of the trained ones for the duration (what the run will ship)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)


def resume(state: Optimiser, ckpt: Checkpointing | None) -> int:
    """Restore the newest checkpoint of `ckpt` into the modules and `state`; the step to start at."""
    if ckpt is None or not (saved := list_checkpoints(ckpt.root)):
        return 0
    start, state.losses = load_checkpoint(state.acc, saved[-1], ckpt.model, state.ema)
    return start


def _due(every: int, step: int, last: int) -> bool:
    return bool(every) and (step % every == 0 or step == last)


def run(params: list[torch.nn.Parameter], o: Optim, step_loss: StepLoss, desc: str, ckpt: Checkpointing | None = None,
        every: tuple[int, Callable[[int], Path | None]] | None = None, track: Tracking | None = None) -> list[float]:
    """AdamW steps on the global-batch mean of `step_loss(step, samples)`, on the device the
    parameters are on; with `o.ema_decay` > 0 the parameters end as their EMA. `every=(n, f)` calls
    f(step) on the main process every n steps and at the last, with the EMA weights in place; a PNG
    path it returns (a validation grid) goes to the tracker as that step's image. `track`: the run's
    tracker, to which the main process logs each step's loss, learning rate, gradient norm and
    samples/s. Returns every step's loss."""
    rank = world()[0]
    tracked = rank == 0 and track is not None
    acc = accelerator(params[0].device, o.mixed_precision, **(accelerator_args(track) if tracked else {}))
    state = Optimiser(acc, params, o, step_loss)
    start = resume(state, ckpt)
    if start and rank == 0:
        print(f"{desc}: resuming from {list_checkpoints(ckpt.root)[-1]} (step {start} of {o.steps})")
    slices = micro_batches(o.batch_size, o.grad_accum_steps)
    bar = Progress(names.key("train", desc), f"train {desc}", o.steps, "step", done=start) if rank == 0 else None
    tracker = open_run(acc, track, start) if tracked else None
    t0, done = time.perf_counter(), start
    try:
        for step in range(start, o.steps):
            t_step = time.perf_counter()
            s = state.step(step, slices)
            if not math.isfinite(s.loss):
                last = list_checkpoints(ckpt.root)[-1] if ckpt is not None and list_checkpoints(ckpt.root) else None
                raise FloatingPointError(f"{desc}: loss is {s.loss} at step {step}; training stopped. Last good checkpoint: "
                                         f"{last or 'none'}. Lower the learning rate or check the data.")
            done = step + 1
            if bar is not None:
                bar.advance(1, lambda: f"loss {np.mean(state.losses[-20:]):.4f} (mean of the last 20), "
                                       f"{(done - start) * o.batch_size / (time.perf_counter() - t0):.1f} samples/s")
            if tracker is not None:
                tracker.scalars({"train/loss": s.loss, "train/lr": s.lr, "train/grad_norm": s.grad_norm,
                                 "train/samples_per_s": o.batch_size / (time.perf_counter() - t_step)}, done)
            if rank == 0 and every is not None and _due(every[0], done, o.steps):
                with state.shipped_weights():
                    grid = every[1](done)
                if tracker is not None and grid is not None:
                    tracker.image("validation", grid, done)
            if ckpt is not None and _due(ckpt.every, done, o.steps):  # every process: each saves its RNG state
                save_checkpoint(acc, ckpt.root, done, ckpt.model, state.ema, state.losses, ckpt.keep_last)
    finally:
        if tracker is not None:
            tracker.close(done)
    if state.ema is not None:
        state.ema.copy_to(params)
    return state.losses
