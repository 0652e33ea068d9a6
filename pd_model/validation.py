"""Validation grids: what the model draws for fixed prompts every N steps, to watch it learn while it trains.

A grid is drawn from the same prompts and the same per-image seeds at every step, so two grids of a
run differ only by the weights. Drawing one must not change training: the global RNG is restored
afterwards and the ControlNet goes back to train mode, so a run's weights are bitwise those of a run
without grids.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from diffusers import ControlNetModel

from pd_core.state import atomic_write_bytes
from pd_data.tasks import Prompt
from pd_model.base import BaseModel
from pd_model.config import Sampler
from pd_model.sampling import generate
from pd_model.visuals import prompt_grid


def grid_rows(n_tasks: int) -> int:
    """One prompt per task; two for a single-task (CN(FT)) model, so its grid shows more than one query."""
    return max(n_tasks, 2)


@torch.no_grad()
def save_validation_grid(base: BaseModel, controlnet: ControlNetModel, prompts: list[Prompt], folder: Path, step: int,
                         seed: int, sampler: Sampler = Sampler(steps=10)) -> Path:
    """`folder/step-NNNNNNN.png` (written atomically): example pair | query | output | target per prompt.

    Few sampler steps on purpose: the grid is for a person watching the run, not a benchmark."""
    dev = next(controlnet.parameters()).device
    was_training = controlnet.training
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):  # CPU (and this GPU) RNG restored
        controlnet.eval()
        try:
            outputs = generate(base, controlnet, prompts, [seed + i for i in range(len(prompts))], sampler)  # (B, H, W, 3) uint8
        finally:
            controlnet.train(was_training)
    buf = io.BytesIO()
    prompt_grid(prompts, outputs).save(buf, format="PNG")
    path = folder / f"step-{step:07d}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path
