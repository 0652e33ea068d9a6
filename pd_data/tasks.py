"""Tasks are data: a registry of specs, and one function that composes a prompt from a spec."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """`source` -> `target`; the text is the target's caption or a fixed string."""

    source: str
    target: str
    text: Literal["caption", "fixed"]
    fixed_text: str = ""
    trained: bool = True
    nearest: str = ""  # unseen tasks: the trained task whose CN(FT) stands in for it (generalisation baseline)

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"

    @property
    def metric(self) -> Literal["fid", "rmse"]:
        """map->image tasks are scored by FID, image->map tasks by RMSE (paper Table 1)."""
        return "fid" if self.target == "image" else "rmse"

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in (self.source, self.target) if m != "image")


def _forward(mod: str, text: str, trained: bool = True, nearest: str = "") -> TaskSpec:
    return TaskSpec("image", mod, "fixed", text, trained, nearest)


def _inverse(mod: str, trained: bool = True, nearest: str = "") -> TaskSpec:
    return TaskSpec(mod, "image", "caption", "", trained, nearest)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    # The six training tasks of the paper.
    _forward("depth", "depth map"), _forward("hed", "hed map"), _forward("seg", "segmentation map"),
    _inverse("depth"), _inverse("hed"), _inverse("seg"),
    # Unseen tasks, never trained: zero-shot generalisation. Nearest trained task: edges are closest
    # to soft edges (hed), surface normals to depth (both are geometry of the nearness field).
    _inverse("canny", False, "hed->image"), _inverse("scribble", False, "hed->image"),
    _inverse("normal", False, "depth->image"), _forward("canny", "canny map", False, "image->hed"),
]}
TRAINING_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.trained)
# In-context task inference shows the same query with an example of each of these (pd_eval.task_inference).
FORWARD_TASKS: tuple[str, ...] = ("image->depth", "image->hed", "image->seg")
UNSEEN_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if not t.trained)


def other_pair_task(name: str, available: tuple[str, ...] = TRAINING_TASKS) -> str | None:
    """The task whose example pair stands in for `name`'s in the example-sensitivity study: another
    task of the same direction (image->map or map->image) among the trained ones in `available`, so
    the text and the query stay those of `name` and only what the pair shows changes. A trained task
    takes the next in registry order (depth -> hed -> seg -> depth); an unseen one the first that is
    not its `nearest` (a canny query shown a hed pair would show nearly its own task). None when no
    other task of that direction is available."""
    spec = get_task(name)
    same = [t for t in TRAINING_TASKS if t in available and t != name
            and (TASKS[t].source == "image") == (spec.source == "image")]
    if not same:
        return None
    if spec.trained:
        order = [t for t in TRAINING_TASKS if t in available and (TASKS[t].source == "image") == (spec.source == "image")]
        return order[(order.index(name) + 1) % len(order)] if len(order) > 1 else None
    return next((t for t in same if t != spec.nearest), same[0])


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


@dataclass(frozen=True)
class Prompt:
    """A vision-language prompt: example pair (source -> target), query, the target to produce, text."""

    task: str
    example_source: np.ndarray  # (H, W, 3) uint8
    example_target: np.ndarray
    query: np.ndarray
    target: np.ndarray
    text: str


def compose_prompt(spec: TaskSpec, example: dict[str, np.ndarray], other: dict[str, np.ndarray],
                   other_caption: str) -> Prompt:
    """Example pair from one image of a group, query and target from another (paper, Training).

    `example` and `other` map a modality ("image", "depth", ...) to its (H, W, 3) uint8 array.
    """
    text = other_caption if spec.text == "caption" else spec.fixed_text
    return Prompt(spec.name, example[spec.source], example[spec.target],
                  other[spec.source], other[spec.target], text)
