"""Metrics: Table 1's RMSE (image->map) and FID (clean-fid, map->image), with KID beside FID and
SSIM/PSNR beside RMSE from torchmetrics; bootstrap 95% intervals for every number."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import warnings

import numpy as np
import torch
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


def bootstrap(stat, n: int, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of `stat(indices)` over `resamples` draws of n indices with replacement."""
    if resamples == 0 or n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = [stat(rng.integers(n, size=n)) for _ in range(resamples)]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def rmse(outputs: np.ndarray, targets: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    return rmse_of(per_image_mse(outputs, targets), resamples, seed)


def rmse_of(mse: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    """RMSE from per-image mean squared errors, with its interval."""
    lo, hi = bootstrap(lambda idx: rmse_from_mse(mse[idx]), len(mse), resamples, seed)
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


def frechet(f1: np.ndarray, f2: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    """FID between two feature sets (N, D); the interval resamples both sets."""
    with warnings.catch_warnings():
        # Fewer images than feature dimensions make singular covariances: expected on small sets,
        # where sqrtm warns but clean-fid's offset keeps the value finite. KID suits small sets better.
        warnings.simplefilter("ignore")
        value = float(cleanfid.fid_from_feats(f1, f2))
        n = min(len(f1), len(f2))
        lo, hi = bootstrap(lambda idx: cleanfid.fid_from_feats(f1[idx % len(f1)], f2[idx % len(f2)]), n, resamples, seed)
    return MetricValue(value, lo, hi, len(f1))


def fid(generated: Path, real: Path, extractor: FeatureExtractor, resamples: int = 200, seed: int = 0) -> MetricValue:
    """FID between two folders of images."""
    return frechet(folder_features(generated, extractor), folder_features(real, extractor), resamples, seed)


def mean_of(per_image: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    lo, hi = bootstrap(lambda idx: float(per_image[idx].mean()), len(per_image), resamples, seed)
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
    lo, hi = bootstrap(lambda idx: float(poly_mmd(fr[idx % len(fr)], fg[idx % len(fg)])), n, resamples, seed)
    return MetricValue(value, lo, hi, len(f_gen))
