"""Value ranges: images and hints are uint8 on disk; the model sees [-1, 1] or [0, 1] as trained."""
from __future__ import annotations

import torch


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1]."""
    return x.float() / 255.0


def to_hint(x: torch.Tensor, hint_range: str) -> torch.Tensor:
    """uint8 -> the hint range the ControlNet was trained with ("-1,1" original, "0,1" research port)."""
    if hint_range == "-1,1":
        return to_unit(x) * 2 - 1
    if hint_range == "0,1":
        return to_unit(x)
    raise ValueError(f"unknown hint_range {hint_range!r}; expected '-1,1' or '0,1'")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
