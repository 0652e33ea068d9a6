"""Training checkpoints: weights as safetensors, optimizer state, trainer state; atomic; last K kept.

A checkpoint is a folder `step-NNNNNNN/` written under a temporary name and renamed into place,
so a kill during a save leaves the previous checkpoints untouched. Every random choice of a step
is drawn from generators seeded by (seed, step) (see `pd_model.loop`), so the step number is the
whole data position: weights + optimizer, schedule, EMA and RNG states + step resume a run exactly.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TRAINER_FILE = "trainer.json"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, states: dict[str, dict],
                    losses: list[float], keep_last: int) -> Path:
    """Write step `step` atomically, then drop all but the newest `keep_last` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    # Optimizer, LR-schedule, EMA and RNG states are tensors and numbers only: they reload with weights_only=True.
    torch.save(states, tmp / "states.pt")
    (tmp / TRAINER_FILE).write_text(json.dumps({"step": step, "losses": losses}))
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


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[int, list[float], dict[str, dict]]:
    """Restore the model in place; returns (step, losses so far, the saved optimizer/scheduler states)."""
    model.load_state_dict(load_file(path / "model.safetensors"))
    states = torch.load(path / "states.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / TRAINER_FILE).read_text())
    return state["step"], state["losses"], states


def save_losses(path: Path, losses: list[float]) -> None:
    """A finished model's losses; written last, it marks the model folder complete."""
    from pd_core.state import atomic_write_bytes

    atomic_write_bytes(path, json.dumps({"loss": losses}).encode())
