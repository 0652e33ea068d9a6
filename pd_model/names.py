"""Model ids, and the one way a user reads them.

A model's id names its training folder and its result and registry rows, so it is path-safe and
stable ("prompt-diffusion", "cn-ft_image-to-depth", "cn-ft-oracle_hed-to-image", "r0003"): a new
spelling would orphan trained folders. What a user reads (task run names, progress lines, artifact
titles) is `label(id)` ("cn-ft image->depth"); every artifact key is `key(...)` of the same words."""
from __future__ import annotations

import re


def model_id(kind: str, task: str | None = None, oracle: bool = False) -> str:
    """The id of the joint model of `kind` (no `task`), or of the single-task model of `task`."""
    if task is None:
        return kind
    return f"{kind}{'-oracle' if oracle else ''}_{task.replace('->', '-to-')}"


def label(model_id: str) -> str:
    """The id as a user reads it: its kind, then its task as the paper writes tasks."""
    kind, _, task = model_id.partition("_")
    return f"{kind} {task.replace('-to-', '->')}" if task else kind


def key(*words: str) -> str:
    """A Prefect artifact key of `words` (lowercase, dashes): key("validation", "cn-ft image->depth",
    "step-40") is "validation-cn-ft-image-to-depth-step-40"."""
    text = " ".join(words).lower().replace("->", "-to-")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
