"""Training checkpoints through accelerate's `save_state` / `load_state`: atomic, last K kept, never unpickled.

A checkpoint is a folder `step-NNNNNNN/`: `model.safetensors` (everything trained, by module name),
`ema.safetensors` (the EMA's shadow weights, when there is an EMA), `trainer.json` (step, losses,
the EMA's counters), and accelerate's `optimizer.bin`, `scheduler.bin`, `scaler.pt` (fp16) and one
`random_states_<rank>.pkl` per process (Python's, NumPy's, torch's and CUDA's generators).

accelerate writes those four with torch.save and reads them back through `accelerate.utils.load`,
i.e. torch.load(weights_only=True) with NumPy's array reconstruction allowed for the RNG file: no
code runs on a load. What it would unpickle for real (weights_only=False) are the objects given to
`register_for_checkpointing`, so the EMA is not one: it is saved here as safetensors. The weights
are saved here too, not by accelerate, which would save the prepared step module (under DDP with
`module.` keys, so that a checkpoint of two processes would not load into one). accelerate skips an
RNG file it cannot read (resuming on more processes than saved) with a log line.

Every process writes into a temporary folder (its RNG state) and the main one renames it into place
once all are done, so a kill during a save leaves the previous checkpoints untouched. Every random
choice of a step is drawn from generators seeded by (seed, step) (see `pd_model.loop`), so the step
number is the whole data position: weights + optimizer, schedule, EMA and RNG states + step resume
a run exactly.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

TRAINER_FILE = "trainer.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


@contextmanager
def _weights_by_name(acc: Accelerator) -> Iterator[None]:
    """accelerate's save_state / load_state without its copy of the prepared module's weights."""
    handles = [acc.register_save_state_pre_hook(lambda models, weights, folder: weights.clear()),
               acc.register_load_state_pre_hook(lambda models, folder: models.clear())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def save_checkpoint(acc: Accelerator, root: Path, step: int, model: torch.nn.Module, ema: EMAModel | None,
                    losses: list[float], keep_last: int) -> Path:
    """Write step `step` atomically, then drop all but the newest `keep_last` checkpoints. Every
    process calls it (each saves its own RNG state); the main process writes the rest."""
    final, tmp = _step_dir(root, step), root / f".tmp-step-{step:07d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # what a save killed at this step left
    acc.wait_for_everyone()
    with _weights_by_name(acc):
        acc.save_state(str(tmp))
    acc.wait_for_everyone()  # every process's RNG file is in before the rename
    if not acc.is_main_process:
        return final
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / MODEL_FILE)
    trainer = {"step": step, "losses": losses}
    if ema is not None:
        state = ema.state_dict()
        save_file({str(i): p.detach().contiguous() for i, p in enumerate(state.pop("shadow_params"))}, tmp / EMA_FILE)
        trainer["ema"] = state  # its counters: numbers and booleans
    (tmp / TRAINER_FILE).write_text(json.dumps(trainer))
    for f in tmp.iterdir():  # on disk before the rename makes the folder visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer(path: Path) -> dict:
    return json.loads((path / TRAINER_FILE).read_text())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / TRAINER_FILE).exists())


def load_checkpoint(acc: Accelerator, path: Path, model: torch.nn.Module, ema: EMAModel | None) -> tuple[int, list[float]]:
    """Restore the model, `acc`'s prepared optimizer, schedule and scaler, the EMA and the RNGs in
    place; returns (step, losses so far)."""
    model.load_state_dict(load_file(path / MODEL_FILE))
    with _weights_by_name(acc):
        acc.load_state(str(path))
    trainer = read_trainer(path)
    if ema is not None:
        shadow = load_file(path / EMA_FILE)
        ema.load_state_dict(trainer["ema"] | {"shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        ema.to(device=next(model.parameters()).device)  # loaded on the CPU; the shadow weights live beside the weights
    return trainer["step"], trainer["losses"]


def save_losses(path: Path, losses: list[float]) -> None:
    """A finished model's losses; written last, it marks the model folder complete."""
    from pd_core.state import atomic_write_bytes

    atomic_write_bytes(path, json.dumps({"loss": losses}).encode())
