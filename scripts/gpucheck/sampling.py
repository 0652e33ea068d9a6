"""Evaluation throughput: samples/s of the evaluate stage's own generation call, and the paper's cost.

Each batch goes through `pd_model.sampling.generate` (the `PromptDiffusionPipeline` with DDIM, text
guidance 9 as two batched branches, the paper's suffix and negative prompt, one CPU generator per
image, VAE decode, PNG-exact uint8 out), the models placed as `pd_eval.generation.Models` places them:
UNet, VAE and ControlNet on the device in fp32, the text encoder on the CPU.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from gpucheck.machine import timed
from gpucheck.record import log

PAPER_STEPS = 100


def prompts(n: int, resolution: int, seed: int = 0) -> list:
    """n prompts of random images (example pair, query, target) and one caption."""
    from pd_data.tasks import Prompt

    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)  # noqa: E731
    return [Prompt("depth->image", img(), img(), img(), img(), "a photo of a red ball on a table") for _ in range(n)]


def paper_work_list() -> dict:
    """The paper profile's evaluation samples per kind of request (as `pd_eval.benchmark.requests` makes
    them): both model kinds on every trained task, each unseen task's prompts under 4 conditions, and
    the 3 forward tasks of in-context task inference."""
    from flows.profiles import load_profile
    from pd_data.tasks import TRAINING_TASKS, UNSEEN_TASKS

    p = load_profile("paper")
    n, u = p.prompts.per_task, min(p.eval.unseen_per_task, p.prompts.per_task)
    counts = {"prompt-diffusion, trained tasks": n * len(TRAINING_TASKS), "cn-ft, trained tasks": n * len(TRAINING_TASKS),
              "unseen tasks, 4 conditions": 4 * u * len(UNSEEN_TASKS),
              "task inference": 3 * min(p.eval.task_inference_queries, n)}
    return {"prompts_per_task": n, "steps": p.eval.steps, "batch_size": p.eval.batch_size, "counts": counts,
            "samples": sum(counts.values())}


def measure_one(base, controlnet, sampler, batch: int, resolution: int, device) -> float:
    from pd_model.sampling import generate

    ps = prompts(batch, resolution)
    out: list = []
    seconds = timed(lambda: out.append(generate(base, controlnet, ps, list(range(batch)), sampler)), device)
    assert out[0].shape == (batch, resolution, resolution, 3) and out[0].dtype == np.uint8
    return seconds


def fid_cost(dim: int, n: int = 64) -> dict:
    """Seconds of one FID value (`pd_eval.metrics.frechet`, no resamples) between two sets of n random
    `dim`-d features, and what the paper profile's intervals multiply it by (one value per resample)."""
    import time

    from flows.profiles import load_profile
    from pd_eval.metrics import frechet

    rng = np.random.default_rng(0)
    f1, f2 = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    t0 = time.perf_counter()
    frechet(f1, f2, resamples=0)
    seconds = time.perf_counter() - t0
    resamples = load_profile("paper").eval.bootstrap
    return {"feature_dim": dim, "images_per_set": n, "seconds_per_value": round(seconds, 3),
            "paper_bootstrap_resamples": resamples, "seconds_per_fid_row_with_interval": round(seconds * (1 + resamples), 1)}


def measure(base, controlnet, resolution: int, device: torch.device, steps: list[int], batches: list[int],
            budget, record, fid_dim: int = 2048) -> dict:
    """A row per (steps, batch), cheapest first, each skipped when its projected time does not fit."""
    from pd_eval.config import EvalConfig

    paper = EvalConfig(protocol="paper").sampler()  # DDIM, guidance 9, suffix and negative prompt of Table 1
    for m in (base.unet, base.vae, controlnet):
        m.to(device).eval()
    measure_one(base, controlnet, replace(paper, steps=2), batches[0], resolution, device)  # warm-up: kernels, cuDNN plans
    rows, per_step = [], None  # per_step: seconds per denoising step per sample, from the last row
    for s, b in sorted(((s, b) for s in steps for b in batches), key=lambda sb: sb[0] * sb[1]):
        what = f"evaluation DDIM {s} batch {b}"
        guess = per_step * s * b if per_step else None
        if guess and guess > budget.left():
            record.skip(what, f"projected {guess:.0f} s, {budget.left():.0f} s left")
            continue
        log(f"{what}" + (f" (~{guess:.0f} s)" if guess else ""))
        sec = measure_one(base, controlnet, replace(paper, steps=s), b, resolution, device)
        per_step = sec / (s * b)
        rows.append({"steps": s, "batch": b, "guidance_scale": paper.guidance_scale, "seconds": round(sec, 3),
                     "samples_per_s": round(b / sec, 3)})
    log(f"evaluation: one {fid_dim}-d FID on the CPU")
    return {"dtype": "fp32 (as the evaluate stage runs)", "sampler": "ddim, text guidance 9, paper suffix and negative prompt",
            "text_encoder_on": "cpu", "resolution": resolution, "rows": rows, "paper_protocol": projection(rows),
            "fid": fid_cost(fid_dim)}


def projection(rows: list[dict]) -> dict | None:
    """The paper profile's whole evaluation on one such device: from the rows with the most steps, per
    batch size, scaled to 100 steps where fewer were measured (a step's cost is the same at any count)."""
    if not rows:
        return None
    work = paper_work_list()
    top = max(r["steps"] for r in rows)
    out = {"samples": work["samples"], "steps": work["steps"], "profile_batch_size": work["batch_size"],
           "counts": work["counts"], "from_steps": top, "hours_on_one_device": {}}
    for r in (r for r in rows if r["steps"] == top):
        rate = r["samples_per_s"] * top / work["steps"]  # samples/s at the protocol's step count
        out["hours_on_one_device"][f"batch {r['batch']}"] = round(work["samples"] / rate / 3600, 3)
    return out
