"""Trivial baselines: the score a model gets without doing the task.

`baseline/copy-example` answers with the example pair's target (the answer if in-context learning
were copying; for map->image, a real image of the query's group, so FID/KID see real pictures);
`baseline/mean-map` with the per-pixel mean of the task's targets over the train split (the mean map
of an image->map task, the mean image of a map->image one: the best constant answer in mean squared
error, rounded to 8 bits like every answer scored from its PNG); for image->map tasks also
`baseline/copy-query` (the query image itself). A trained model that
does not beat every baseline of its task has not shown that it learnt the task.
"""
from __future__ import annotations

import numpy as np

from pd_data.dataset import SplitData
from pd_data.tasks import Prompt, TaskSpec

COPY_EXAMPLE, MEAN_MAP = "baseline/copy-example", "baseline/mean-map"
BASELINES: tuple[str, ...] = ("baseline/copy-query", MEAN_MAP, COPY_EXAMPLE)


def baselines_for(spec: TaskSpec) -> tuple[str, ...]:
    """The baselines that answer `spec`: all three for image->map; copy-example and the mean image for
    map->image (the mean image is the bar of the pixel-wise paired scores, which reward blur)."""
    return BASELINES if spec.metric == "rmse" else (MEAN_MAP, COPY_EXAMPLE)


def mean_map(train: SplitData, modality: str) -> np.ndarray:
    """(H, W, 3) float64 per-pixel mean of every train map of `modality` (0..255 scale)."""
    total, n = None, 0
    for a in train.arrays.values():  # a running sum: one map in memory at a time, at any dataset size
        if modality in a:
            m = a[modality].astype(np.float64)
            total, n = (m if total is None else total + m), n + 1
    if not n:
        raise ValueError(f"no {modality!r} maps in the train split; the mean-map baseline needs them "
                         f"(is {modality!r} in data.annotators?)")
    return total / n


def baseline_outputs(name: str, spec: TaskSpec, prompts: list[Prompt], train: SplitData) -> np.ndarray:
    """(N, H, W, 3) answers of baseline `name` to `prompts` of task `spec`."""
    if name not in baselines_for(spec):
        known = "" if name in BASELINES else f"unknown baseline {name!r}; "
        raise ValueError(f"{known}{spec.name} ({spec.metric}) is answered by {baselines_for(spec)}; "
                         f"copy-query answers image->map tasks only")
    if name == COPY_EXAMPLE:
        return np.stack([p.example_target for p in prompts])
    if name == "baseline/copy-query":
        return np.stack([p.query for p in prompts])
    return np.broadcast_to(mean_map(train, spec.target), (len(prompts), *prompts[0].target.shape))
