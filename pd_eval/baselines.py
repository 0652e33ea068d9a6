"""Trivial baselines for image->map tasks: the RMSE a model gets without learning the task.

`baseline/copy-query` answers with the query image itself; `baseline/mean-map` answers every
query with the per-pixel mean of the task's target maps over the train split (the best constant
answer in mean squared error). A trained model that does not beat both has not learned the map.
"""
from __future__ import annotations

import numpy as np

from pd_data.dataset import SplitData
from pd_data.tasks import Prompt, TaskSpec

BASELINES: tuple[str, ...] = ("baseline/copy-query", "baseline/mean-map")


def mean_map(train: SplitData, modality: str) -> np.ndarray:
    """(H, W, 3) float64 per-pixel mean of every train map of `modality` (0..255 scale)."""
    maps = [a[modality] for a in train.arrays.values() if modality in a]
    if not maps:
        raise ValueError(f"no {modality!r} maps in the train split; the mean-map baseline needs them "
                         f"(is {modality!r} in data.annotators?)")
    return np.stack(maps).astype(np.float64).mean(axis=0)


def baseline_outputs(name: str, spec: TaskSpec, prompts: list[Prompt], train: SplitData) -> np.ndarray:
    """(N, H, W, 3) answers of baseline `name` to `prompts` of an image->map task."""
    if spec.metric != "rmse":
        raise ValueError(f"baselines answer image->map tasks only, not {spec.name!r}")
    if name == "baseline/copy-query":
        return np.stack([p.query for p in prompts])
    if name == "baseline/mean-map":
        return np.broadcast_to(mean_map(train, spec.target), (len(prompts), *prompts[0].target.shape))
    raise ValueError(f"unknown baseline {name!r}; known: {BASELINES}")
