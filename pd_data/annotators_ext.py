"""ControlNet annotators from controlnet-aux and transformers, read from local weights only.

Importing this module registers two backends in `pd_data.annotate.ANNOTATORS`:

- ``controlnet_aux``: canny, hed, scribble, depth, normal, lineart, mlsd. The weight files are
  those of the Hugging Face repo ``lllyasviel/Annotators`` (see ``AUX_SPECS``), read from
  ``weights_dir``, else ``$PD_ANNOTATOR_WEIGHTS``, else the local Hugging Face cache.
  ``scribble`` is HED followed by controlnet-aux's scribble post-processing (thinning, blur,
  threshold), as ControlNet 1.0's "fake scribble" did: it shares ``ControlNetHED.pth`` with hed.
- ``transformers``: seg, a UperNet in ``save_pretrained`` layout (``openmmlab/upernet-convnext-small``),
  read from ``weights_dir``, else ``$PD_SEG_WEIGHTS``, else the local Hugging Face cache; the class
  map is coloured with the ADE20k palette of ControlNet's seg annotator.

The first of weights_dir / environment variable that is set is the only place looked in (no
silent fallback to another copy); the cache is looked up with ``local_files_only=True``, so
nothing is ever downloaded.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pd_data.annotate import ANNOTATORS

AUX_ENV = "PD_ANNOTATOR_WEIGHTS"
AUX_REPO = "lllyasviel/Annotators"
SEG_ENV = "PD_SEG_WEIGHTS"
SEG_REPO = "openmmlab/upernet-convnext-small"


@dataclass(frozen=True)
class AuxSpec:
    """How one modality maps onto a controlnet-aux detector."""

    detector: str  # class name in controlnet_aux
    files: tuple[str, ...]  # weight files its from_pretrained reads (defaults of 0.0.10)
    kwargs: dict = field(default_factory=dict)  # fixed call arguments
    binary: bool = False  # a 0/255 map: kept binary when resized back
    tag: str = ""  # suffix of the annotator name when the call arguments change the map's kind


AUX_SPECS: dict[str, AuxSpec] = {
    "canny": AuxSpec("CannyDetector", (), {"low_threshold": 100, "high_threshold": 200}, binary=True),
    "hed": AuxSpec("HEDdetector", ("ControlNetHED.pth",), {"safe": False}),
    "scribble": AuxSpec("HEDdetector", ("ControlNetHED.pth",), {"scribble": True}, binary=True, tag="scribble"),
    "depth": AuxSpec("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "normal": AuxSpec("NormalBaeDetector", ("scannet.pt",)),
    "lineart": AuxSpec("LineartDetector", ("sk_model.pth", "sk_model2.pth"), {"coarse": False}),
    "mlsd": AuxSpec("MLSDdetector", ("mlsd_large_512_fp32.pth",), {"thr_v": 0.1, "thr_d": 0.1}, binary=True),
}

# The ADE20k palette (150 classes, index = class id) of ControlNet's seg annotator, as mmseg's
# ADE20KDataset.PALETTE and controlnet_aux.util.ade_palette() list it.
ADE20K_PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
    [120, 120, 80], [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7],
    [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70], [8, 255, 51],
    [255, 6, 82], [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
    [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255], [255, 7, 71],
    [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10],
    [7, 255, 255], [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
    [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153], [6, 51, 255],
    [235, 12, 255], [160, 150, 20], [0, 163, 255], [140, 140, 140], [250, 10, 15],
    [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0], [153, 255, 0],
    [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112],
    [0, 255, 133], [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0],
    [0, 143, 255], [51, 255, 0], [0, 82, 255], [0, 255, 41], [0, 255, 173],
    [10, 0, 255], [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
    [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20], [255, 184, 184],
    [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255],
    [0, 122, 255], [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
    [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0], [8, 184, 170],
    [133, 0, 255], [0, 255, 92], [184, 0, 255], [255, 0, 31], [0, 184, 255],
    [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255], [112, 224, 255],
    [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235],
    [245, 0, 255], [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0],
    [0, 204, 255], [20, 0, 255], [255, 255, 0], [0, 153, 255], [0, 41, 255],
    [0, 255, 204], [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
    [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255], [184, 255, 0],
    [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_image(image: np.ndarray) -> None:
    """Annotators take (H, W, 3) uint8 RGB; anything else is a caller's bug, said plainly."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(f"annotators take an (H, W, 3) uint8 RGB array, got {got}")


def _as_rgb_uint8(detected) -> np.ndarray:
    """A detector's output (PIL or array, 1 or 3 channels) as (H, W, 3) uint8."""
    arr = np.asarray(detected)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _resize_to(arr: np.ndarray, height: int, width: int, binary: bool) -> np.ndarray:
    """Back to the input's size; binary maps are re-thresholded so thin edges survive downsizing."""
    if arr.shape[:2] == (height, width):
        return arr
    out = np.asarray(Image.fromarray(arr).resize((width, height), Image.BILINEAR))
    if binary:
        # 64 rather than 128: after a ~2x reduction a one-pixel line covers about a quarter of a pixel.
        out = np.where(out >= 64, 255, 0).astype(np.uint8)
    return out


def _detect_resolution(height: int, width: int) -> int:
    """The short side rounded up to controlnet-aux's 64-px grid: resize_image snaps both sides to
    multiples of 64 (a 32-px side would round to 0), and rounding up never discards detail."""
    return max(64, 64 * math.ceil(min(height, width) / 64))


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, computed once per (path, size, mtime) in this process."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def hash_weights(paths: list[Path]) -> str:
    """The weights' identity: sha256 of each file, joined by '+' in a fixed order; '' for none."""
    return "+".join(file_sha256(p) for p in paths)


def _missing_weights(modality: str, missing: list[str], folder: Path | None, env: str, repo: str) -> FileNotFoundError:
    """The error for absent weights: which files, where to put them, where they come from."""
    files = ", ".join(missing)
    if folder is not None:
        where = f"put {files} in {folder} (or set {env} / pass weights_dir)"
    else:  # nothing configured and the Hugging Face cache has no copy
        where = (f"put {files} in a folder and pass it as weights_dir or set {env} to it "
                 f"(the local Hugging Face cache of {repo} has none)")
    return FileNotFoundError(f"weights for {modality!r} not found: {where}; "
                             f"the files are those of huggingface.co/{repo}. Nothing is downloaded.")


def _configured_dir(weights_dir: Path | str | None, env: str) -> Path | None:
    """An explicit weights_dir wins, then the environment variable; None means: use the HF cache."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return None


def resolve_aux_weights(modality: str, weights_dir: Path | str | None = None) -> list[Path]:
    """Paths of the weight files of one controlnet-aux modality, all in one folder; never downloads."""
    files = AUX_SPECS[modality].files
    folder = _configured_dir(weights_dir, AUX_ENV)
    if folder is not None:
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise _missing_weights(modality, missing, folder, AUX_ENV, AUX_REPO)
        return [folder / f for f in files]
    from huggingface_hub import hf_hub_download

    paths, missing = [], []
    for f in files:
        try:
            paths.append(Path(hf_hub_download(AUX_REPO, f, local_files_only=True)))
        except Exception:  # not cached (LocalEntryNotFoundError), or a broken cache entry
            missing.append(f)
    if missing:
        raise _missing_weights(modality, missing, None, AUX_ENV, AUX_REPO)
    return paths


# ---------------------------------------------------------------------------------------------
# controlnet_aux backend


@functools.cache
def _controlnet_aux():
    """controlnet_aux, imported once without its import-time warnings (timm renames, no mediapipe)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import controlnet_aux
    return controlnet_aux


class ControlNetAuxAnnotator:
    """One controlnet-aux detector behind the project's Annotator signature, on the CPU."""

    def __init__(self, modality: str, detector, weights_hash: str = ""):
        self.modality = modality
        self.spec = AUX_SPECS[modality]
        self.detector = detector
        self.name = f"controlnet_aux.{type(detector).__name__}" + (f"+{self.spec.tag}" if self.spec.tag else "")
        self.version = importlib.metadata.version("controlnet-aux")
        self.weights_hash = weights_hash

    @classmethod
    def from_pretrained(cls, modality: str, weights_dir: Path | str | None = None) -> "ControlNetAuxAnnotator":
        """Load the modality's detector from local weight files (see resolve_aux_weights)."""
        if modality not in AUX_SPECS:
            raise ValueError(f"unknown controlnet_aux modality {modality!r}; known: {sorted(AUX_SPECS)}")
        spec = AUX_SPECS[modality]
        paths = resolve_aux_weights(modality, weights_dir) if spec.files else []
        detector_cls = getattr(_controlnet_aux(), spec.detector)
        if not spec.files:
            return cls(modality, detector_cls())
        # from_pretrained reads <folder>/<default file name> when given a folder.
        detector = detector_cls.from_pretrained(str(paths[0].parent))
        return cls(modality, detector.to("cpu"), hash_weights(paths))

    @classmethod
    def from_model(cls, modality: str, *networks, weights_hash: str = "") -> "ControlNetAuxAnnotator":
        """Wrap already-built networks, passed to the detector's constructor (e.g. MidasDetector(model))."""
        detector_cls = getattr(_controlnet_aux(), AUX_SPECS[modality].detector)
        return cls(modality, detector_cls(*networks), weights_hash)

    def __call__(self, image: np.ndarray, provenance: dict) -> np.ndarray:
        _check_image(image)
        height, width = image.shape[:2]
        res = _detect_resolution(height, width)
        detected = self.detector(image, detect_resolution=res, image_resolution=res, output_type="np",
                                 **self.spec.kwargs)
        return _resize_to(_as_rgb_uint8(detected), height, width, self.spec.binary)


# ---------------------------------------------------------------------------------------------
# transformers backend

_SEG_CONFIGS = ("config.json", "preprocessor_config.json")
_SEG_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_seg_folder(weights_dir: Path | str | None = None) -> Path:
    """The folder of a UperNet in save_pretrained layout; never downloads."""
    folder = _configured_dir(weights_dir, SEG_ENV)
    if folder is None:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(SEG_REPO, local_files_only=True))
        except Exception:  # not cached
            folder = None
    need = [*_SEG_CONFIGS, "model.safetensors (or pytorch_model.bin)"]
    if folder is None:
        raise _missing_weights("seg", need, None, SEG_ENV, SEG_REPO)
    missing = [f for f in _SEG_CONFIGS if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in _SEG_WEIGHTS):
        missing.append(need[-1])
    if missing:
        raise _missing_weights("seg", missing, folder, SEG_ENV, SEG_REPO)
    return folder


def _seg_weight_files(folder: Path) -> list[Path]:
    """The files holding the tensors (shards included), in a fixed order."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return files


class UperNetSegAnnotator:
    """ADE20k semantic segmentation with a transformers UperNet, coloured with ADE20K_PALETTE."""

    def __init__(self, model, processor, weights_hash: str = ""):
        n = model.config.num_labels
        if n != len(ADE20K_PALETTE):
            raise ValueError(f"the seg model predicts {n} classes; the ADE20k palette has {len(ADE20K_PALETTE)}")
        self.model = model.eval().to("cpu")
        self.processor = processor
        self.name = f"transformers.{type(model).__name__}"
        self.version = importlib.metadata.version("transformers")
        self.weights_hash = weights_hash

    @classmethod
    def from_pretrained(cls, weights_dir: Path | str | None = None) -> "UperNetSegAnnotator":
        """Load model and image processor from a local folder (see resolve_seg_folder)."""
        folder = resolve_seg_folder(weights_dir)
        from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

        model = UperNetForSemanticSegmentation.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, hash_weights(_seg_weight_files(folder)))

    def __call__(self, image: np.ndarray, provenance: dict) -> np.ndarray:
        import torch

        _check_image(image)
        height, width = image.shape[:2]
        inputs = self.processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            outputs = self.model(pixel_values=inputs["pixel_values"])
        # Logits are upsampled to the input's size before the argmax, so class borders stay sharp.
        classes = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[(height, width)])[0]
        return ADE20K_PALETTE[classes.cpu().numpy()]


# ---------------------------------------------------------------------------------------------
# Registration (pd_data.annotate imports this module lazily)

ANNOTATORS["controlnet_aux"] = {
    m: functools.partial(ControlNetAuxAnnotator.from_pretrained, m) for m in AUX_SPECS
}
ANNOTATORS["transformers"] = {"seg": UperNetSegAnnotator.from_pretrained}
