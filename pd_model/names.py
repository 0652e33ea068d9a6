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


REPLICATE = "@r"  # replicate r > 0 of a model: "prompt-diffusion@r2" (replicate 0 keeps the plain id)


def replicate_id(model_id: str, replicate: int) -> str:
    """The id of replicate `replicate` of `model_id`: an independent training on the same data and
    prompts from another seed. Replicate 0 is the model itself."""
    return model_id if replicate == 0 else f"{model_id}{REPLICATE}{replicate}"


def replicate_of(model_id: str) -> tuple[str, int]:
    """("prompt-diffusion", 2) for "prompt-diffusion@r2"; (model_id, 0) for an id without a replicate."""
    head, sep, r = model_id.rpartition(REPLICATE)
    return (head, int(r)) if sep and r.isdigit() else (model_id, 0)


def label(model_id: str) -> str:
    """The id as a user reads it: its kind, then its task as the paper writes tasks, then its replicate."""
    model_id, replicate = replicate_of(model_id)
    kind, _, task = model_id.partition("_")
    text = f"{kind} {task.replace('-to-', '->')}" if task else kind
    return f"{text}, replicate {replicate}" if replicate else text


def key(*words: str) -> str:
    """A Prefect artifact key of `words` (lowercase, dashes): key("validation", "cn-ft image->depth",
    "step-40") is "validation-cn-ft-image-to-depth-step-40"."""
    text = " ".join(words).lower().replace("->", "-to-")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
