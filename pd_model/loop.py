"""The optimisation loop every training shares: one step, its resume, its checkpoints.

`run` is the driver: resume from the newest checkpoint, then `Optimiser.step` per step, a callback
(validation grids) and a checkpoint every N steps, each step's loss, learning rate, gradient norm and
samples/s to the run's tracker (`pd_model.tracking`, main process only). Every random choice of a
step comes from generators seeded by (seed, step), so weights + optimizer + EMA + step number are a
run's whole state (with the global RNG's, saved too), and a run killed at any step resumes to
bitwise the same weights.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from pd_core.progress import Progress
from pd_model import names
from pd_model.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from pd_model.tracking import Tracking, open_tracker

StepLoss = Callable[[int, range], torch.Tensor]  # (step, this micro-batch's sample indices) -> mean loss


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
    autocast: tuple[str, torch.dtype] | None = None  # (device type, dtype), e.g. ("cuda", torch.bfloat16)

    @classmethod
    def of(cls, cfg, steps: int, autocast: tuple[str, torch.dtype] | None) -> "Optim":
        """The optimisation settings of a training config (`train` or `base`): the fields both name
        alike, and the defaults here for those a config does not have (the base has no warm-up)."""
        names = {"batch_size": "batch_size", "lr": "learning_rate", "weight_decay": "weight_decay",
                 "grad_clip": "grad_clip", "warmup_steps": "warmup_steps", "ema_decay": "ema_decay",
                 "grad_accum_steps": "grad_accum_steps"}
        given = {ours: getattr(cfg, theirs) for ours, theirs in names.items() if hasattr(cfg, theirs)}
        return cls(steps=steps, autocast=autocast, **given)


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


def _sum_hook(_state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP communication hook: sum a `dist.GradBucket` over processes (DDP's default averages; each
    process's loss is already its share of the global-batch mean)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


class _StepModule(torch.nn.Module):
    """A step's loss as a module over the trained parameters: what DistributedDataParallel wraps, so
    that each gradient bucket is all-reduced as soon as backward has filled it, overlapping the rest
    of backward."""

    def __init__(self, params: list[torch.nn.Parameter], step_loss: StepLoss):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)  # the same Parameter objects, not copies
        self.step_loss = step_loss

    def forward(self, step: int, idx: range) -> torch.Tensor:
        return self.step_loss(step, idx)


def data_parallel(params: list[torch.nn.Parameter], step_loss: StepLoss, bucket_mb: float = 25.0) -> Callable:
    """`step_loss` for this process: as it is on one process; on several, through DDP (bucketed,
    overlapped all-reduce summing gradients; `no_sync` on all but a step's last micro-batch)."""
    if world()[1] == 1:
        return lambda step, idx, last: step_loss(step, idx)
    from torch.nn.parallel import DistributedDataParallel

    device = params[0].device
    ddp = DistributedDataParallel(_StepModule(params, step_loss), device_ids=[device] if device.type == "cuda" else None,
                                  broadcast_buffers=False, bucket_cap_mb=bucket_mb)
    ddp.register_comm_hook(None, _sum_hook)

    def call(step: int, idx: range, last: bool) -> torch.Tensor:
        if last:
            return ddp(step, idx)
        with ddp.no_sync():  # a forward under no_sync: its backward accumulates locally, the last one reduces all
            return ddp(step, idx)
    return call


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
    """AdamW + warm-up schedule + optional EMA over `params`, and the losses so far.

    Each process backpropagates sum-over-its-samples / batch_size; summing over processes gives the
    gradient of the global mean, whatever the number of processes and micro-batches."""

    def __init__(self, params: list[torch.nn.Parameter], o: Optim):
        self.params, self.o = params, o
        # Mixed precision takes the fused AdamW kernel (one pass over each parameter's state); fp32 keeps
        # the default implementation, so its weights stay bitwise those of every earlier fp32 run.
        self.opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=o.autocast is not None or None)
        self.sched = warmup_schedule(self.opt, o.warmup_steps)
        self.ema = EMAModel(params, decay=o.ema_decay) if o.ema_decay > 0 else None
        # fp16 overflows where bf16 does not: its gradients are scaled up, and steps with inf skipped.
        fp16 = o.autocast is not None and o.autocast[1] == torch.float16
        self.scaler = torch.amp.GradScaler(o.autocast[0]) if fp16 else None
        self.losses: list[float] = []

    def step(self, step: int, step_loss: StepLoss, slices: list[range]) -> StepStats:
        """One optimizer step on the global batch of `step` (not applied if its loss is not finite).

        `step_loss` as `data_parallel` returns it: (step, idx, last micro-batch?) -> this share's loss."""
        o, lr = self.o, self.sched.get_last_lr()[0]
        self.opt.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for m, idx in enumerate(slices):
            with torch.autocast(*(o.autocast or ("cpu",)), enabled=o.autocast is not None):
                part = step_loss(step, idx, m == len(slices) - 1) * (len(idx) / o.batch_size)
            (part if self.scaler is None else self.scaler.scale(part)).backward()
            loss = loss + part.detach().float().cpu()
        if world()[1] > 1:
            loss = loss.to(self.params[0].device)
            dist.all_reduce(loss)
            loss = loss.cpu()
        if not math.isfinite(loss.item()):
            return StepStats(loss.item(), lr, math.nan)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)  # skipped when a gradient is inf/nan; the scale then shrinks
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.step(self.params)
        self.losses.append(loss.item())
        return StepStats(loss.item(), lr, grad_norm.item())

    def states(self) -> dict:
        """Optimizer, schedule, EMA and the global RNG: tensors and numbers only (weights_only loads)."""
        s = {"optimizer": self.opt.state_dict(), "lr_scheduler": self.sched.state_dict(), "rng": torch.get_rng_state()}
        s |= {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        return s | ({"ema": self.ema.state_dict()} if self.ema is not None else {})

    def load_states(self, s: dict) -> None:
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["lr_scheduler"])
        torch.set_rng_state(s["rng"])
        if self.scaler is not None and "scaler" in s:
            self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
            self.ema.to(device=self.params[0].device)  # loaded on the CPU; the shadow weights live beside the weights

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
    start, state.losses, states = load_checkpoint(saved[-1], ckpt.model)
    state.load_states(states)
    return start


def _due(every: int, step: int, last: int) -> bool:
    return bool(every) and (step % every == 0 or step == last)


def run(params: list[torch.nn.Parameter], o: Optim, step_loss: StepLoss, desc: str, ckpt: Checkpointing | None = None,
        every: tuple[int, Callable[[int], Path | None]] | None = None, track: Tracking | None = None) -> list[float]:
    """AdamW steps on the global-batch mean of `step_loss(step, samples)`; with `o.ema_decay` > 0 the
    parameters end as their EMA. `every=(n, f)` calls f(step) on the main process every n steps and at
    the last, with the EMA weights in place; a PNG path it returns (a validation grid) goes to the
    tracker as that step's image. `track`: the run's tracker, to which the main process logs each step's
    loss, learning rate, gradient norm and samples/s. Returns every step's loss."""
    rank = world()[0]
    state = Optimiser(params, o)
    start = resume(state, ckpt)
    if start and rank == 0:
        print(f"{desc}: resuming from {list_checkpoints(ckpt.root)[-1]} (step {start} of {o.steps})")
    slices = micro_batches(o.batch_size, o.grad_accum_steps)
    loss_of = data_parallel(params, step_loss)
    bar = Progress(names.key("train", desc), f"train {desc}", o.steps, "step", done=start) if rank == 0 else None
    tracker = open_tracker(track, start) if rank == 0 and track is not None else None
    t0, done = time.perf_counter(), start
    try:
        for step in range(start, o.steps):
            t_step = time.perf_counter()
            s = state.step(step, loss_of, slices)
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
            if rank == 0 and ckpt is not None and _due(ckpt.every, done, o.steps):
                save_checkpoint(ckpt.root, done, ckpt.model, state.states(), state.losses, ckpt.keep_last)
    finally:
        if tracker is not None:
            tracker.close(done)
    if state.ema is not None:
        state.ema.copy_to(params)
    return state.losses
