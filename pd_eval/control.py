"""Controllability: does an output follow its query map? Re-annotate the output with its condition's
annotator (`read`) and compare with the input map (`query`), as ControlNet++ does; FID cannot see it.

Every function takes `read` and `query` as (N, H, W, 3) uint8 and returns per-image scores, (N,) arrays,
so that the caller can bootstrap them and pair two models image by image. Modalities are data: the
`CONTROL_METRICS` registry names each modality's metrics (the headline first), whether higher is better,
and the per-image function; `control_scores` is the one front door.

- depth: per-image MSE on a 0..1 scale, reported as RMSE (`pd_eval.metrics.rmse_of`).
- soft edges (hed, scribble): MS-SSIM (torchmetrics' 5 scales, 11-px Gaussian) where both sides are at
  least `MSSSIM_MIN_SIDE`, else single-scale SSIM, named `ctrl_msssim` / `ctrl_ssim` so the two never mix;
  plus per-image MSE (RMSE).
- seg: both maps snapped to the nearest palette colour; the headline is the dataset-level mIoU
  (`ctrl_dataset_miou`: intersections and unions summed over images per class, then the mean over
  classes present anywhere), the number segmentation papers and ControlNet++ report. The per-image mIoU
  (`ctrl_miou`, over the classes present in either map of the image) and pixel accuracy are for paired
  comparisons; `seg_counts` gives the per-image intersections and unions to bootstrap the headline.
- canny: F1 of the binary edges (gray >= 128), exact pixel positions; an image with no edges in both
  maps scores 1 (nothing to draw and nothing drawn is a perfect answer), one empty side scores 0.
- normal: mean angular error in degrees between the decoded unit normals (n = rgb / 127.5 - 1, the
  inverse of `pd_data.procedural.normal_map`'s (n + 1) * 127.5).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                           structural_similarity_index_measure)

from pd_eval.metrics import MetricValue, bootstrap, mean_of, per_image_mse, rmse_of

# torchmetrics' MS-SSIM defaults: 5 scales (betas), an 11-px Gaussian. It requires
# side // 2**(2 * (scales - 1)) > kernel - 1, i.e. side // 16 >= 11: at least 176 px (its error message
# says "larger than 160", but 161..175 fail too). Smaller maps get single-scale SSIM.
MSSSIM_SCALES, SSIM_KERNEL = 5, 11
MSSSIM_MIN_SIDE = SSIM_KERNEL * max(1, MSSSIM_SCALES - 1) ** 2  # 176
CANNY_THRESHOLD = 128  # gray level at or above which a pixel is an edge

Palette = np.ndarray | Mapping[str, tuple[int, int, int]]


@dataclass(frozen=True)
class Metric:
    """One controllability number: its direction, the value of a perfect read, and how per-image
    values make the reported figure (`rmse`: sqrt of the mean per-image MSE; `mean`: their mean)."""

    name: str
    higher_is_better: bool
    ceiling: float
    summary: Literal["mean", "rmse"]

    def summarise(self, per_image: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
        return (rmse_of if self.summary == "rmse" else mean_of)(np.asarray(per_image, np.float64), resamples, seed)


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("ctrl_rmse", False, 0.0, "rmse"),  # per-image values are MSEs on a 0..1 scale
    Metric("ctrl_ssim", True, 1.0, "mean"),
    Metric("ctrl_msssim", True, 1.0, "mean"),
    Metric("ctrl_dataset_miou", True, 1.0, "mean"),  # pooled over images: see `dataset_miou`, not a per-image mean
    Metric("ctrl_miou", True, 1.0, "mean"),
    Metric("ctrl_pixel_acc", True, 1.0, "mean"),
    Metric("ctrl_f1", True, 1.0, "mean"),
    Metric("ctrl_angle", False, 0.0, "mean"),  # degrees
]}


def _check(read: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    read, query = np.asarray(read), np.asarray(query)
    if read.shape != query.shape or read.ndim != 4 or read.shape[-1] != 3:
        raise ValueError(f"read {read.shape} and query {query.shape} must both be (N, H, W, 3) uint8 maps of one size; "
                         f"resize the re-annotation to the query's size first")
    if read.dtype != np.uint8 or query.dtype != np.uint8:
        raise ValueError(f"maps must be uint8 0..255, got read {read.dtype} and query {query.dtype}; "
                         f"convert with np.clip(x, 0, 255).round().astype(np.uint8)")
    return read, query


def _gray(maps: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 1, H, W) float32 0..1, the channel mean (edge maps are gray)."""
    return torch.from_numpy(maps.astype(np.float32).mean(-1) / 255.0)[:, None]


def ssim_name(height: int, width: int) -> str:
    """The soft-edge similarity a size allows: `ctrl_msssim` from `MSSSIM_MIN_SIDE` px on both sides."""
    return "ctrl_msssim" if min(height, width) >= MSSSIM_MIN_SIDE else "ctrl_ssim"


def depth_scores(read: np.ndarray, query: np.ndarray) -> dict[str, np.ndarray]:
    read, query = _check(read, query)
    return {"ctrl_rmse": per_image_mse(read, query)}


def soft_edge_scores(read: np.ndarray, query: np.ndarray) -> dict[str, np.ndarray]:
    read, query = _check(read, query)
    r, q = _gray(read), _gray(query)  # (N, 1, H, W)
    name = ssim_name(*read.shape[1:3])
    fn = multiscale_structural_similarity_index_measure if name == "ctrl_msssim" else structural_similarity_index_measure
    sim = fn(r, q, data_range=1.0, kernel_size=SSIM_KERNEL, reduction="none").numpy().astype(np.float64)  # (N,)
    return {name: sim, "ctrl_rmse": per_image_mse(read, query)}


def as_palette(palette: Palette) -> np.ndarray:
    """A palette as a (K, 3) int array: `procedural.SEG_PALETTE` (a dict) or `ADE20K_PALETTE` (an array)."""
    p = np.array(list(palette.values()) if isinstance(palette, Mapping) else palette, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) < 1:
        raise ValueError(f"a palette is (K, 3) RGB colours or a dict name -> RGB; got shape {p.shape}")
    return p


def palette_index(maps: np.ndarray, palette: Palette) -> np.ndarray:
    """(N, H, W, 3) colours -> (N, H, W) index of the nearest palette colour (squared RGB distance)."""
    p = as_palette(palette)
    x = np.asarray(maps).astype(np.int64)
    # Distances to every colour at once: (N, H, W, K); K is 6 (demo) to 150 (ADE20K), so chunk by image.
    return np.stack([((m[..., None, :] - p) ** 2).sum(-1).argmin(-1) for m in x]) if len(x) else np.zeros(x.shape[:3], int)


def seg_counts(read: np.ndarray, query: np.ndarray, palette: Palette) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-class intersection and union pixel counts, two (N, K) int arrays."""
    read, query = _check(read, query)
    k = len(as_palette(palette))
    r, q = palette_index(read, palette).reshape(len(read), -1), palette_index(query, palette).reshape(len(query), -1)
    inter, union = np.zeros((len(r), k), np.int64), np.zeros((len(r), k), np.int64)
    for i, (a, b) in enumerate(zip(r, q)):
        ca, cb = np.bincount(a, minlength=k), np.bincount(b, minlength=k)
        inter[i] = np.bincount(a[a == b], minlength=k)
        union[i] = ca + cb - inter[i]
    return inter, union


def dataset_miou(inter: np.ndarray, union: np.ndarray) -> float:
    """Segmentation papers' mIoU: per class, intersections over unions summed over all images; the mean
    over classes with a non-empty union."""
    i, u = np.asarray(inter).sum(0), np.asarray(union).sum(0)
    present = u > 0
    return float((i[present] / u[present]).mean()) if present.any() else 1.0


def dataset_miou_value(inter: np.ndarray, union: np.ndarray, resamples: int = 200, seed: int = 0) -> MetricValue:
    """`dataset_miou` with a 95% percentile interval from resampling images (rows of the counts)."""
    lo, hi = bootstrap(lambda idx: dataset_miou(inter[idx], union[idx]), len(inter), resamples, seed)
    return MetricValue(dataset_miou(inter, union), lo, hi, len(inter))


def seg_scores(read: np.ndarray, query: np.ndarray, palette: Palette) -> dict[str, np.ndarray]:
    inter, union = seg_counts(read, query, palette)
    present = union > 0  # classes in either map of the image
    iou = np.where(present, inter / np.maximum(union, 1), 0.0)
    miou = iou.sum(1) / present.sum(1)  # every image has at least one class present
    pixels = np.shape(read)[1] * np.shape(read)[2]
    return {"ctrl_miou": miou, "ctrl_pixel_acc": inter.sum(1) / pixels}


def canny_scores(read: np.ndarray, query: np.ndarray) -> dict[str, np.ndarray]:
    read, query = _check(read, query)
    n = len(read)
    r = (read.astype(np.float64).mean(-1) >= CANNY_THRESHOLD).reshape(n, -1)
    q = (query.astype(np.float64).mean(-1) >= CANNY_THRESHOLD).reshape(n, -1)
    tp = (r & q).sum(1)
    drawn = r.sum(1) + q.sum(1)  # 2 TP + FP + FN
    return {"ctrl_f1": np.where(drawn == 0, 1.0, 2 * tp / np.maximum(drawn, 1))}


def decode_normals(maps: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> unit normals (N, H, W, 3) float64, undoing (n + 1) * 127.5."""
    n = np.asarray(maps, np.float64) / 127.5 - 1.0
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)  # a gray 127 pixel is no direction: eps


def normal_scores(read: np.ndarray, query: np.ndarray) -> dict[str, np.ndarray]:
    read, query = _check(read, query)
    cos = np.clip((decode_normals(read) * decode_normals(query)).sum(-1), -1.0, 1.0)  # (N, H, W)
    return {"ctrl_angle": np.degrees(np.arccos(cos)).reshape(len(read), -1).mean(1)}


@dataclass(frozen=True)
class ControlSpec:
    """A modality's controllability test: the metrics its `score` may return (headline first, for each
    size), what re-annotates it in the literature, and whether `score` needs the segmentation palette."""

    modality: str
    metrics: tuple[str, ...]
    score: Callable[..., dict[str, np.ndarray]]
    reference: str
    needs_palette: bool = False

    def headline(self, height: int, width: int) -> str:
        """The number to report first at this map size."""
        if self.modality == "seg":
            return "ctrl_dataset_miou"
        return ssim_name(height, width) if "ctrl_ssim" in self.metrics else self.metrics[0]

    def higher_is_better(self, name: str) -> bool:
        return METRICS[name].higher_is_better


_SOFT = ("ctrl_msssim", "ctrl_ssim", "ctrl_rmse")
CONTROL_METRICS: dict[str, ControlSpec] = {s.modality: s for s in [
    ControlSpec("depth", ("ctrl_rmse",), depth_scores, "ControlNet++: DPT depth, RMSE"),
    ControlSpec("hed", _SOFT, soft_edge_scores, "ControlNet++: ControlNet HED, MS-SSIM"),
    ControlSpec("scribble", _SOFT, soft_edge_scores, "soft edges, as hed"),
    ControlSpec("seg", ("ctrl_dataset_miou", "ctrl_miou", "ctrl_pixel_acc"), seg_scores,
                "ControlNet++: Mask2Former on ADE20K, mIoU", needs_palette=True),
    ControlSpec("canny", ("ctrl_f1",), canny_scores, "ControlNet++: Canny at fixed thresholds, F1"),
    ControlSpec("normal", ("ctrl_angle",), normal_scores, "mean angular error, as surface-normal papers"),
]}


def control_spec(modality: str) -> ControlSpec:
    if modality not in CONTROL_METRICS:
        raise ValueError(f"no controllability metric for modality {modality!r}; known modalities: {sorted(CONTROL_METRICS)}")
    return CONTROL_METRICS[modality]


def control_scores(modality: str, read: np.ndarray, query: np.ndarray,
                   palette: Palette | None = None) -> dict[str, np.ndarray]:
    """Per-image controllability scores of `modality`: metric name -> (N,) array (see `CONTROL_METRICS`).
    `palette` (seg only) is the label colours both maps are snapped to."""
    spec = control_spec(modality)
    if spec.needs_palette and palette is None:
        raise ValueError(f"{modality!r} maps need palette=, the label colours; pass pd_data.procedural.SEG_PALETTE for "
                         f"the demo's maps or pd_data.annotator_weights.ADE20K_PALETTE for ADE20K ones")
    if not spec.needs_palette and palette is not None:
        raise ValueError(f"{modality!r} maps take no palette= (a palette applies to seg only); leave it out")
    return spec.score(read, query, palette) if spec.needs_palette else spec.score(read, query)


def summarise(modality: str, read: np.ndarray, query: np.ndarray, palette: Palette | None = None,
              resamples: int = 200, seed: int = 0) -> dict[str, MetricValue]:
    """Every metric of `modality` as a reported figure with its 95% interval, the headline first."""
    spec, scores = control_spec(modality), control_scores(modality, read, query, palette)
    out = {}
    if spec.needs_palette:
        out["ctrl_dataset_miou"] = dataset_miou_value(*seg_counts(read, query, palette), resamples, seed)
    out |= {name: METRICS[name].summarise(v, resamples, seed) for name, v in scores.items()}
    return out
