"""Metrics of Table 1: RMSE for image->map tasks, FID (clean-fid) for map->image tasks; bootstrap CIs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import warnings

import numpy as np
import torch
from cleanfid import fid as cleanfid

from pd_eval.features import FeatureExtractor


@dataclass(frozen=True)
class MetricValue:
    value: float
    ci_low: float
    ci_high: float
    n: int


def per_image_mse(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 pairs -> (N,) mean over pixels and channels of ((x - y) / 255)^2."""
    d = (outputs.astype(np.float64) - targets.astype(np.float64)) / 255.0
    return (d**2).reshape(len(d), -1).mean(axis=1)


def rmse_from_mse(mse: np.ndarray) -> float:
    """Paper's RMSE: sqrt(mean over images of the per-image mean squared error), on a 0..1 scale."""
    return float(np.sqrt(np.mean(mse)))


def bootstrap(stat, n: int, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of `stat(indices)` over `resamples` draws of n indices with replacement."""
    if resamples == 0 or n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = [stat(rng.integers(n, size=n)) for _ in range(resamples)]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def rmse(outputs: np.ndarray, targets: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    mse = per_image_mse(outputs, targets)
    lo, hi = bootstrap(lambda idx: rmse_from_mse(mse[idx]), len(mse), resamples, seed)
    return MetricValue(rmse_from_mse(mse), lo, hi, len(mse))


def folder_features(folder: Path, extractor: FeatureExtractor) -> np.ndarray:
    """clean-fid's resizing and quantisation ("clean" mode), then the extractor: (N, D) features."""
    return cleanfid.get_folder_features(str(folder), model=extractor, num_workers=0, batch_size=64,
                                        device=torch.device("cpu"), mode="clean", verbose=False)


def fid(generated: Path, real: Path, extractor: FeatureExtractor, resamples: int = 200, seed: int = 0) -> MetricValue:
    """FID between two folders of images; the interval resamples both sets' features."""
    f1, f2 = folder_features(generated, extractor), folder_features(real, extractor)
    with warnings.catch_warnings():
        # Fewer images than feature dimensions make singular covariances: expected on small sets,
        # where sqrtm warns but clean-fid's offset keeps the value finite. KID suits small sets better.
        warnings.simplefilter("ignore")
        value = float(cleanfid.fid_from_feats(f1, f2))
        n = min(len(f1), len(f2))
        lo, hi = bootstrap(lambda idx: cleanfid.fid_from_feats(f1[idx % len(f1)], f2[idx % len(f2)]), n, resamples, seed)
    return MetricValue(value, lo, hi, len(f1))
