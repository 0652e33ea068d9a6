"""Training throughput of the paper's step, through the pipeline's own code.

One step is `pd_model.loop.Optimiser.step` (accelerate's autocast, AdamW with the paper profile's settings, clipping)
over `pd_model.objective.denoising_loss` (VAE encode, per-sample noise and timestep from the objective's
per-sample generators, Prompt Diffusion ControlNet residuals, frozen UNet, MSE), through
`pd_model.loop.Optimiser` on an `Accelerator` (DDP when several processes), the weights laid out by
`pd_model.precision.fast_layout` as the train stage lays them out. Only the data are synthetic: fixed
random images, hints and text embeddings (the train stage caches the frozen text encoder's). What is
trained is what the paper profile trains: the ControlNet, the UNet frozen.
"""
from __future__ import annotations

import gc
import math
import statistics
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from gpucheck.machine import sync, timed
from gpucheck.record import log


class Step:
    """The optimiser step of one global batch of `batch` samples (this process's share of it)."""

    def __init__(self, base, controlnet, batch: int, resolution: int, precision: str, device: torch.device):
        from flows.profiles import load_profile
        from pd_model.loop import Optim, Optimiser, accelerator, micro_batches

        cfg = load_profile("paper").train  # lr 1e-4, weight decay, clipping, snr_gamma and timesteps as the paper trains
        self.cfg, self.base, self.controlnet, self.device = cfg, base, controlnet, device
        self.params = [p for p in controlnet.parameters() if p.requires_grad]
        self.opt = Optimiser(accelerator(device, precision), self.params,
                             replace(Optim.of(cfg, 10**9, precision), batch_size=batch, grad_accum_steps=1), self._loss)
        self.slices = micro_batches(batch, 1)  # this process's samples of the global batch
        n = len(self.slices[0])
        g = torch.Generator().manual_seed(1)
        r, text = resolution, (base.tokenizer.model_max_length, base.unet.config.cross_attention_dim)
        self.target = (torch.rand(n, 3, r, r, generator=g) * 2 - 1).to(device)  # (n, 3, R, R) in [-1, 1]
        self.pair = (torch.rand(n, 6, r, r, generator=g) * 2 - 1).to(device)  # (n, 6, R, R): the hint range
        self.query = (torch.rand(n, 3, r, r, generator=g) * 2 - 1).to(device)
        self.emb = torch.randn(n, *text, generator=g).to(device)  # (n, T, D), as the text cache hands them
        self.step_index = 0

    def _loss(self, step: int, idx: range) -> torch.Tensor:
        from pd_model.objective import Batch, denoising_loss, sample_generators

        k = slice(0, len(idx))  # this process's tensors hold its share only
        batch = Batch(self.target[k], [""] * len(idx), self.pair[k], self.query[k])
        gens = sample_generators((self.cfg.seed, step), idx)
        return denoising_loss(self.base, batch, self.emb[k], gens, self.controlnet, self.cfg.snr_gamma, self.cfg.timesteps)

    def __call__(self) -> float:
        stats = self.opt.step(self.step_index, self.slices)
        self.step_index += 1
        return stats.loss

    def close(self) -> None:
        for p in self.params:
            p.grad = None


@contextmanager
def compiled(modules: list[torch.nn.Module], backend: str | None):
    """torch.compile on each module's forward for the block (None: as they are); then as they were."""
    if backend is None:
        yield
        return
    for m in modules:
        m.forward = torch.compile(m.forward, backend=backend, dynamic=False)
    try:
        yield
    finally:
        for m in modules:
            del m.forward  # the instance attribute: the class's forward again
        torch._dynamo.reset()


def count_flops(step: Step) -> float:
    """FLOPs of one step (forward + backward), counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux: the process's peak


def time_steps(step: Step, device: torch.device, seconds: float, at_most: int = 20) -> list[float]:
    """Step times: two, then as many more as fit in `seconds` (3 at least, `at_most` in all)."""
    times = [timed(step, device) for _ in range(min(2, at_most))]
    more = max(1, min(at_most - len(times), int(seconds / max(statistics.median(times), 1e-6)) - len(times)))
    return times + [timed(step, device) for _ in range(more)]


def measure_row(base, controlnet, batch: int, resolution: int, precision: str, device, backend: str | None,
                seconds: float, flops: float | None, at_most: int = 20) -> dict:
    """One (batch, compile) configuration: first step (compilation included), FLOPs, timed steps, memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = Step(base, controlnet, batch, resolution, precision, device)
    try:
        with compiled([controlnet, base.unet], backend):
            first = timed(step, device)
            if flops is None and backend is None:
                flops = count_flops(step)
            times = time_steps(step, device, seconds, at_most)
            loss = step.opt.losses[-1] if step.opt.losses else float("nan")
    finally:
        step.close()
        del step
        gc.collect()
    med = statistics.median(times)
    row = {"batch": batch, "compile": backend is not None, "compile_backend": backend, "steps_timed": len(times),
           "first_step_s": round(first, 3), "step_s_median": round(med, 4),
           "step_s_min_max": [round(min(times), 4), round(max(times), 4)], "samples_per_s": round(batch / med, 2),
           "peak_memory_gib": peak_memory_gib(device), "loss_finite": math.isfinite(loss)}
    if flops:
        row |= {"gflop_per_step": round(flops / 1e9, 1), "achieved_tflops": round(flops / med / 1e12, 4)}
    return row


def with_utilisation(row: dict, datasheet_tflops: float | None, measured_tflops: float | None) -> dict:
    """MFU against the datasheet's dense bf16 peak, and the fraction of the measured matmul rate."""
    achieved = row.get("achieved_tflops")
    row["mfu_vs_datasheet_bf16"] = round(achieved / datasheet_tflops, 3) if achieved and datasheet_tflops else None
    row["fraction_of_measured_matmul"] = round(achieved / measured_tflops, 3) if achieved and measured_tflops else None
    return row


def measure(base, controlnet, resolution: int, device: torch.device, batches: list[int], backend: str | None,
            budget, record, flops_by_batch: dict[int, float], at_most: int = 20) -> list[dict]:
    """Rows for each batch at one compile setting, within the section's time; `flops_by_batch` is filled
    by the eager rows and read by the compiled ones (compilation does not change the count)."""
    from pd_model.precision import fast_layout, resolve

    precision = resolve("auto", device)  # the train stage's default: bf16 autocast on CUDA, fp32 on a CPU
    controlnet.to(device).train().requires_grad_(True)
    rows = []
    with fast_layout([controlnet, base.unet], precision, device):
        for i, b in enumerate(batches):
            what = f"training batch {b}, compile {'on (' + backend + ')' if backend else 'off'}"
            share = budget.left() / (len(batches) - i)
            if budget.left() <= 0:
                record.skip(what, "the section's time is spent")
                continue
            if backend and rows and budget.left() < 1.5 * rows[-1]["first_step_s"]:
                record.skip(what, f"{budget.left():.0f} s left, the last compilation took {rows[-1]['first_step_s']:.0f} s")
                continue
            log(f"{what}: ~{share:.0f} s")
            row = measure_row(base, controlnet, b, resolution, precision, device, backend, 0.5 * share,
                              flops_by_batch.get(b), at_most)
            if row.get("gflop_per_step"):
                flops_by_batch.setdefault(b, row["gflop_per_step"] * 1e9)
            rows.append(row)
            sync(device)
    controlnet.eval().requires_grad_(False)
    return rows
