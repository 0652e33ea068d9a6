"""Metrics: Table 1's RMSE (image->map) and FID (clean-fid, map->image), with KID beside FID and
SSIM/PSNR beside RMSE from torchmetrics; bootstrap 95% intervals (scipy.stats.bootstrap) for every number."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import warnings

import numpy as np
import torch
from scipy import stats
from threadpoolctl import threadpool_limits
from cleanfid import fid as cleanfid
from cleanfid.resize import build_resizer
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

from pd_eval.features import FeatureExtractor


@dataclass(frozen=True)
class MetricValue:
    value: float
    ci_low: float
    ci_high: float
    n: int


def _unit(images: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    """(N, H, W, C) 0..255 -> (N, C, H, W) on a 0..1 scale."""
    return torch.from_numpy(np.asarray(images, dtype=np.float64) / 255.0).permute(0, 3, 1, 2).to(dtype).contiguous()


def per_image_mse(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, H, W, C) pairs on a 0..255 scale -> (N,) mean over pixels and channels of ((x - y) / 255)^2."""
    o, t = _unit(outputs), _unit(targets)
    return np.array([float(mean_squared_error(a, b)) for a, b in zip(o, t)])


def rmse_from_mse(mse: np.ndarray) -> float:
    """Paper's RMSE: sqrt(mean over images of the per-image mean squared error), on a 0..1 scale."""
    return float(np.sqrt(np.mean(mse)))


def interval(data: tuple[np.ndarray, ...], statistic, resamples: int, seed: int, method: str = "BCa",
             vectorized: bool = True, paired: bool = False) -> tuple[float, float]:
    """95% bootstrap interval of `statistic(*data)` (scipy.stats.bootstrap, its draws from `seed`). Where BCa
    is undefined (constant data: every jackknife value the same) the percentile interval of the same draws.
    NaN for no resamples or fewer than 2 observations in a sample."""
    if resamples == 0 or min(len(d) for d in data) < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):  # BCa's 0 / 0
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(data, statistic, n_resamples=resamples, method=method, vectorized=vectorized,
                              paired=paired, rng=np.random.default_rng(seed))
        lo, hi = res.confidence_interval
        if np.isnan(lo) or np.isnan(hi):
            lo, hi = np.percentile(res.bootstrap_distribution, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap(stat, n: int, resamples: int, seed: int, method: str = "percentile") -> tuple[float, float]:
    """95% interval of `stat(indices)` over `resamples` draws of n indices with replacement."""
    return interval((np.arange(n),), stat, resamples, seed, method, vectorized=False)


def set_interval(stat, n1: int, n2: int, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of `stat(i1, i2)`, a distance between two sets of rows (FID, KID) at row
    indices i1, i2. Sets of one size are taken as the same items (image i of both from prompt i, as `score`
    passes them) and resampled by item; others each on its own.

    Not BCa: a resample repeats images, which raises a set distance, so most resampled FIDs lie above the
    estimate (80 to 90% of them on 16-image sets); BCa then moves its ends to about the 0.005% and 50%
    points, the lower one the smallest of 200 resamples. Its jackknife would also cost n more sqrtm's."""
    return interval((np.arange(n1), np.arange(n2)), stat, resamples, seed, "percentile", vectorized=False,
                    paired=n1 == n2)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _rmse(mse: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sqrt(np.mean(mse, axis=axis))  # rmse_from_mse of each resample


def rmse(outputs: np.ndarray, targets: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    return rmse_of(per_image_mse(outputs, targets), resamples, seed)


def rmse_of(mse: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    """RMSE from per-image mean squared errors, with its BCa interval."""
    lo, hi = interval((mse,), _rmse, resamples, seed)
    return MetricValue(rmse_from_mse(mse), lo, hi, len(mse))


def folder_features(folder: Path, extractor: FeatureExtractor) -> np.ndarray:
    """clean-fid's resizing and quantisation ("clean" mode), then the extractor: (N, D) features."""
    return cleanfid.get_folder_features(str(folder), model=extractor, num_workers=0, batch_size=64,
                                        device=torch.device("cpu"), mode="clean", verbose=False)


def image_features(images: np.ndarray, extractor: FeatureExtractor, batch: int = 64) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, D) float64 features, as clean-fid computes them for a folder."""
    net = CleanFeatures(extractor)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return np.concatenate([net(x[i:i + batch]).numpy() for i in range(0, len(x), batch)])


# Feature sizes up to this compute FID at one BLAS thread. On the offline extractor's 128-d features
# numpy's OpenBLAS loses more to handing small products between threads than it gains: one resampled
# 16-image FID took 16 to 56 ms at two threads and 7 ms at one on the 2-core machine, and the demo's
# metrics 144 s against 25 (scripts/bench_metrics.py compare, every metric row bitwise the same;
# tests/test_eval_speed.py). Inception's 2048-d features keep every thread.
SINGLE_THREAD_FID_DIM = 512


def frechet(f1: np.ndarray, f2: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    """FID between two feature sets (N, D); the interval resamples both sets (`set_interval`)."""
    small = max(np.shape(f1)[-1], np.shape(f2)[-1]) <= SINGLE_THREAD_FID_DIM
    with warnings.catch_warnings(), threadpool_limits(1 if small else None, user_api="blas"):
        # Fewer images than feature dimensions make singular covariances: expected on small sets,
        # where sqrtm warns but clean-fid's offset keeps the value finite. KID suits small sets better.
        warnings.simplefilter("ignore")
        value = float(cleanfid.fid_from_feats(f1, f2))
        lo, hi = set_interval(lambda i, j: cleanfid.fid_from_feats(f1[i], f2[j]), len(f1), len(f2), resamples, seed)
    return MetricValue(value, lo, hi, len(f1))


def fid(generated: Path, real: Path, extractor: FeatureExtractor, resamples: int = 200, seed: int = 0) -> MetricValue:
    """FID between two folders of images."""
    return frechet(folder_features(generated, extractor), folder_features(real, extractor), resamples, seed)


def mean_of(per_image: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    """Mean of a per-image score (SSIM, PSNR), with its BCa interval."""
    lo, hi = interval((per_image,), _mean, resamples, seed)
    return MetricValue(float(per_image.mean()), lo, hi, len(per_image))


def per_image_similarity(outputs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image SSIM and PSNR (dB) on a 0..1 scale (torchmetrics): two (N,) arrays."""
    o, t = _unit(outputs, torch.float32), _unit(targets, torch.float32)
    ssim = structural_similarity_index_measure(o, t, data_range=1.0, reduction="none").numpy()  # (N,)
    psnr = peak_signal_noise_ratio(o, t, data_range=1.0, reduction="none", dim=(1, 2, 3)).numpy()  # (N,)
    return {"ssim": ssim.astype(np.float64), "psnr": psnr.astype(np.float64)}


def map_similarity(outputs: np.ndarray, targets: np.ndarray, resamples: int = 200, seed: int = 0) -> dict[str, MetricValue]:
    """Mean per-image SSIM and PSNR, higher is better, with intervals."""
    return {k: mean_of(v, resamples, seed) for k, v in per_image_similarity(outputs, targets).items()}


class CleanFeatures(torch.nn.Module):
    """torchmetrics feature module: uint8 (B, 3, H, W) -> clean-fid's "clean" resize to 299 px -> the
    FID extractor -> (B, D); KID thus sees exactly the features that FID sees."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor, self.resize = extractor, build_resizer("clean")

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = np.stack([self.resize(a) for a in imgs.permute(0, 2, 3, 1).numpy()])  # (B, 299, 299, 3) float 0..255
        return self.extractor(torch.from_numpy(x).permute(0, 3, 1, 2).float()).double()  # (B, D)


def kid(generated: np.ndarray, real: np.ndarray, extractor: FeatureExtractor, resamples: int = 200, seed: int = 0,
        subsets: int = 100, subset_size: int = 1000) -> MetricValue:
    """KID between (N, H, W, 3) uint8 sets (`kernel_distance` of their features)."""
    return kernel_distance(image_features(generated, extractor), image_features(real, extractor), resamples, seed,
                           subsets, subset_size)


class _Given(torch.nn.Module):
    """torchmetrics' feature module for features computed already."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def kernel_distance(f_gen: np.ndarray, f_real: np.ndarray, resamples: int = 200, seed: int = 0, subsets: int = 100,
                    subset_size: int = 1000) -> MetricValue:
    """KID (torchmetrics, polynomial kernel) between two feature sets (N, D). `subset_size` is clamped
    to the smaller set, so small evaluation sets work; the interval resamples both sets, as for FID."""
    n = min(len(f_gen), len(f_real))
    if n < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(f_gen)} generated and {len(f_real)} real")
    with warnings.catch_warnings():  # "will save all extracted features": intended
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Given(), subsets=subsets, subset_size=min(subset_size, n))
    fr, fg = torch.from_numpy(np.asarray(f_real, np.float64)), torch.from_numpy(np.asarray(f_gen, np.float64))
    metric.update(fr, real=True)
    metric.update(fg, real=False)
    with torch.random.fork_rng():  # torchmetrics draws its subsets from the global generator
        torch.manual_seed(seed)
        value = float(metric.compute()[0])
    lo, hi = set_interval(lambda i, j: float(poly_mmd(fr[i], fg[j])), len(fr), len(fg), resamples, seed)
    return MetricValue(value, lo, hi, len(f_gen))
