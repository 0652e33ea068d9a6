"""ControlNet annotators from controlnet-aux and transformers, read from local weights only.

Two backends, which `register` adds to `pd_data.annotate.ANNOTATORS` when one is first asked for:

- ``controlnet_aux``: canny, hed, scribble, depth, normal, lineart, mlsd. The weight files are
  those of the Hugging Face repo ``lllyasviel/Annotators`` (see ``AUX_SPECS``), read from the
  ``data.annotator_weights`` folder itself. ``scribble`` is HED followed by controlnet-aux's
  scribble post-processing (thinning, blur, threshold), as ControlNet 1.0's "fake scribble" did: it
  shares ``ControlNetHED.pth`` with hed. ``depth`` is MiDaS v3 dpt-hybrid through timm (with timm
  1.0.31 its state-dict keys and shapes are those of the released dpt_hybrid-midas-501f0c75.pt).
- ``transformers`` (see ``HF_SPECS``): seg, a UperNet (``openmmlab/upernet-convnext-small``), coloured
  with the ADE20k palette of ControlNet's seg annotator; depth, the same MiDaS v3 dpt-hybrid as
  ``Intel/dpt-hybrid-midas`` (``DPTForDepthEstimation``). Each is a ``save_pretrained`` folder
  (config.json, model.safetensors or pytorch_model.bin, and the image processor's
  preprocessor_config.json: required for seg, optional for depth) in a sub-folder of
  ``data.annotator_weights`` named after the repo. These run on CUDA when present (else the CPU) and
  map a list of images in batches with ``batch(images)``.

One ``data.annotator_weights`` folder serves every annotator::

    <data.annotator_weights>/
        ControlNetHED.pth  dpt_hybrid-midas-501f0c75.pt  scannet.pt  ...   (controlnet_aux)
        upernet-convnext-small/{config.json, preprocessor_config.json, model.safetensors}
        dpt-hybrid-midas/{config.json, model.safetensors[, preprocessor_config.json]}

Where weights are looked for, in order; the first that is set is the only place looked in (no
silent fallback to another copy): ``data.annotator_weights`` (the ``weights_dir`` argument); for a
transformers model, ``$PD_SEG_WEIGHTS`` / ``$PD_DEPTH_WEIGHTS`` naming its folder itself;
``$PD_ANNOTATOR_WEIGHTS``, read as ``data.annotator_weights`` is; the local Hugging Face cache of
the repo, looked up with ``local_files_only=True``. Nothing is ever downloaded, and a missing file is
an error naming it, the folder it must go in and the setting.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SETTING = "data.annotator_weights"  # the user-facing setting every missing-weights error names
AUX_ENV = "PD_ANNOTATOR_WEIGHTS"  # the same folder as data.annotator_weights, from the environment
AUX_REPO = "lllyasviel/Annotators"
SEG_ENV = "PD_SEG_WEIGHTS"
SEG_REPO = "openmmlab/upernet-convnext-small"
DEPTH_ENV = "PD_DEPTH_WEIGHTS"
DEPTH_REPO = "Intel/dpt-hybrid-midas"


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


@dataclass(frozen=True)
class HFSpec:
    """Where one transformers annotator's save_pretrained folder lives."""

    repo: str  # Hugging Face repo id; its name is the folder's name under data.annotator_weights
    env: str  # environment variable naming the folder itself
    configs: tuple[str, ...]  # files the folder must hold besides the weights

    @property
    def subfolder(self) -> str:
        return self.repo.rsplit("/", 1)[-1]


HF_SPECS: dict[str, HFSpec] = {
    "seg": HFSpec(SEG_REPO, SEG_ENV, ("config.json", "preprocessor_config.json")),
    "depth": HFSpec(DEPTH_REPO, DEPTH_ENV, ("config.json",)),  # no processor config: MiDaS's (DPTDepthAnnotator)
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


def _configured(weights_dir: Path | str | None, sub: str = "", env: str | None = None) -> tuple[Path, str] | None:
    """The one folder to look in and the setting that named it: data.annotator_weights (+ sub), then
    $env (the folder itself), then $PD_ANNOTATOR_WEIGHTS (+ sub); None means: use the HF cache."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser() / sub, f"{SETTING}={weights_dir}"
    for var, tail in ((env, ""), (AUX_ENV, sub)):
        if var and os.environ.get(var):
            return Path(os.environ[var]).expanduser() / tail, f"${var}={os.environ[var]}"
    return None


def _missing_weights(modality: str, missing: list[str], found: tuple[Path, str] | None, repo: str,
                     sub: str = "", env: str | None = None) -> FileNotFoundError:
    """The error for absent weights: which files, the folder they go in, and the setting naming it."""
    files = ", ".join(missing)
    home = f"<{SETTING}>/{sub}/" if sub else f"<{SETTING}>/"
    if found is not None:
        what = f"{found[0]} (from {found[1]}) lacks {files}; put {'it' if len(missing) == 1 else 'them'} there"
    else:  # nothing configured and the Hugging Face cache has no copy
        what = (f"{SETTING} is not set and the local Hugging Face cache has no {repo}; "
                f"set {SETTING} to a folder and put {files} in {home}")
    alt = f"${env} naming that folder itself, or " if env else ""
    return FileNotFoundError(
        f"weights for {modality!r} not found: {what}. Expected: {home} holding the files of huggingface.co/{repo} "
        f"(or {alt}${AUX_ENV} in place of {SETTING}). Nothing is downloaded.")


def resolve_aux_weights(modality: str, weights_dir: Path | str | None = None) -> list[Path]:
    """Paths of the weight files of one controlnet-aux modality, all in one folder; never downloads."""
    files = AUX_SPECS[modality].files
    found = _configured(weights_dir)
    if found is not None:
        missing = [f for f in files if not (found[0] / f).is_file()]
        if missing:
            raise _missing_weights(modality, missing, found, AUX_REPO)
        return [found[0] / f for f in files]
    from huggingface_hub import hf_hub_download

    paths, missing = [], []
    for f in files:
        try:
            paths.append(Path(hf_hub_download(AUX_REPO, f, local_files_only=True)))
        except Exception:  # not cached (LocalEntryNotFoundError), or a broken cache entry
            missing.append(f)
    if missing:
        raise _missing_weights(modality, missing, None, AUX_REPO)
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


def default_device() -> str:
    """Where the annotator networks run: the GPU when one is visible."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ControlNetAuxAnnotator:
    """One controlnet-aux detector behind the project's Annotator signature, on CUDA when present."""

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
        return cls(modality, detector.to(default_device()), hash_weights(paths))  # its __call__ follows the weights

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

_WEIGHTS_HINT = "model.safetensors (or pytorch_model.bin)"


def _weight_files(folder: Path) -> list[Path]:
    """The files holding the tensors (shards included), in a fixed order."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def resolve_hf_folder(modality: str, weights_dir: Path | str | None = None) -> Path:
    """The save_pretrained folder of one transformers annotator (see the module docstring); never downloads."""
    spec = HF_SPECS[modality]
    found = _configured(weights_dir, spec.subfolder, spec.env)
    if found is None:
        from huggingface_hub import snapshot_download

        try:
            found = Path(snapshot_download(spec.repo, local_files_only=True)), "the Hugging Face cache"
        except Exception:  # not cached
            raise _missing_weights(modality, [*spec.configs, _WEIGHTS_HINT], None, spec.repo,
                                   spec.subfolder, spec.env) from None
    folder = found[0]
    missing = [f for f in spec.configs if not (folder / f).is_file()]
    missing += [] if _weight_files(folder) else [_WEIGHTS_HINT]
    if missing:
        err = _missing_weights(modality, missing, found, spec.repo, spec.subfolder, spec.env)
        if not folder.is_dir() and (folder.parent / "config.json").is_file():  # the model folder itself was named
            err.args = (f"{err} ({folder.parent} is itself a model folder: set {SETTING} to the folder above it)",)
        raise err
    return folder


def _same_shape_runs(images: list[np.ndarray], size: int):
    """Consecutive images of one shape, at most `size` at a time, in order."""
    run: list[np.ndarray] = []
    for image in images:
        if run and (len(run) == size or image.shape != run[0].shape):
            yield run
            run = []
        run.append(image)
    if run:
        yield run


class TransformersAnnotator:
    """A transformers model and its image processor behind the Annotator signature.

    Runs on CUDA when present, else the CPU (or on `device`). `batch(images)` maps a list of (H, W, 3)
    uint8 images with one forward pass per `batch_size` consecutive images of one shape; each map
    depends on its own image only (eval mode, per-image post-processing), so `a(image, prov)` equals
    `a.batch([image])[0]` and a batch's maps equal the single-image maps up to float rounding.
    """

    modality: str
    model_class: str  # the transformers class read from the folder
    batch_size = 8

    def __init__(self, model, processor, weights_hash: str = "", device: str | None = None):
        import torch

        self.device = torch.device(device or default_device())
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.name = f"transformers.{type(model).__name__}"
        self.version = importlib.metadata.version("transformers")
        self.weights_hash = weights_hash

    @classmethod
    def from_pretrained(cls, weights_dir: Path | str | None = None, device: str | None = None):
        """Load model and image processor from a local folder (see resolve_hf_folder)."""
        import transformers

        folder = resolve_hf_folder(cls.modality, weights_dir)
        model = getattr(transformers, cls.model_class).from_pretrained(folder, local_files_only=True)
        return cls(model, cls.load_processor(folder, model), hash_weights(_weight_files(folder)), device)

    @staticmethod
    def load_processor(folder: Path, model):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(folder, local_files_only=True)

    def __call__(self, image: np.ndarray, provenance: dict) -> np.ndarray:
        return self.batch([image])[0]

    def batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        for image in images:
            _check_image(image)
        maps: list[np.ndarray] = []
        for run in _same_shape_runs(images, self.batch_size):
            pixels = self.processor(images=run, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode():
                maps += self.postprocess(self.model(pixel_values=pixels), run[0].shape[:2])
        return maps

    def postprocess(self, outputs, size: tuple[int, int]) -> list[np.ndarray]:
        """The model's outputs for a batch as (H, W, 3) uint8 maps of the inputs' size."""
        raise NotImplementedError


class UperNetSegAnnotator(TransformersAnnotator):
    """ADE20k semantic segmentation with a transformers UperNet, coloured with ADE20K_PALETTE."""

    modality, model_class = "seg", "UperNetForSemanticSegmentation"

    def __init__(self, model, processor, weights_hash: str = "", device: str | None = None):
        n = model.config.num_labels
        if n != len(ADE20K_PALETTE):
            raise ValueError(f"the seg model predicts {n} classes; the ADE20k palette has {len(ADE20K_PALETTE)}")
        super().__init__(model, processor, weights_hash, device)

    def postprocess(self, outputs, size):
        # Logits are upsampled to the input's size before the argmax, so class borders stay sharp.
        classes = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[size] * len(outputs.logits))
        return [ADE20K_PALETTE[c.cpu().numpy()] for c in classes]


class DPTDepthAnnotator(TransformersAnnotator):
    """MiDaS relative inverse depth as ControlNet's depth annotator draws it: normalised to 0..255 per
    image (nearest white), resized to the input's size, the same value in all three channels.

    Unlike controlnet-aux's MidasDetector (fed the image at its own size, rounded to 64 px), the network
    sees it resized to its fixed input (384 px for dpt-hybrid-midas): transformers' hybrid embedding does
    not interpolate its position embeddings.
    """

    modality, model_class = "depth", "DPTForDepthEstimation"

    @staticmethod
    def load_processor(folder: Path, model):
        if (folder / "preprocessor_config.json").is_file():
            return TransformersAnnotator.load_processor(folder, model)
        from transformers import DPTImageProcessor

        # MiDaS's dpt-hybrid preprocessing: bicubic resize to the network's input size, then [-1, 1]
        # (the processor's default mean = std = 0.5, i.e. ControlNet's x / 127.5 - 1).
        h, w = (model.config.image_size,) * 2 if isinstance(model.config.image_size, int) else model.config.image_size
        return DPTImageProcessor(size={"height": h, "width": w})

    def postprocess(self, outputs, size):
        import torch
        import torch.nn.functional as F

        depth = outputs.predicted_depth  # (B, h, w), larger is nearer
        lo, hi = depth.amin(dim=(1, 2), keepdim=True), depth.amax(dim=(1, 2), keepdim=True)
        depth = (depth - lo) / (hi - lo).clamp_min(1e-12)  # per image, as ControlNet's MiDaS annotator
        depth = F.interpolate(depth[:, None], size=size, mode="bilinear", align_corners=False)  # (B, 1, H, W)
        maps = (depth * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)  # (B, H, W, 3)
        return list(np.ascontiguousarray(maps.cpu().numpy()))


def resolve_weights(backend: str, modality: str, weights_dir: Path | str | None = None) -> list[Path]:
    """The weight files one registered annotator would load, found without loading anything (for a
    preflight): [] for weight-free ones; FileNotFoundError naming data.annotator_weights if absent."""
    if backend == "controlnet_aux" and modality in AUX_SPECS:
        return resolve_aux_weights(modality, weights_dir) if AUX_SPECS[modality].files else []
    if backend == "transformers" and modality in HF_SPECS:
        return _weight_files(resolve_hf_folder(modality, weights_dir))
    raise ValueError(f"no {backend!r} annotator for {modality!r}; known: controlnet_aux {sorted(AUX_SPECS)}, "
                     f"transformers {sorted(HF_SPECS)}")


# ---------------------------------------------------------------------------------------------
# Registration (pd_data.annotate.OPTIONAL_BACKENDS names this module)


def register(registry: dict, backend: str) -> None:
    """Add one backend's factories (modality -> factory(weights_dir)) to `registry`. Its package must be
    installed (its module has the backend's name), else ModuleNotFoundError now rather than at first load."""
    if importlib.util.find_spec(backend) is None:
        raise ModuleNotFoundError(f"No module named {backend!r}", name=backend)
    if backend == "controlnet_aux":
        registry[backend] = {m: functools.partial(ControlNetAuxAnnotator.from_pretrained, m) for m in AUX_SPECS}
    elif backend == "transformers":
        registry[backend] = {c.modality: c.from_pretrained for c in (UperNetSegAnnotator, DPTDepthAnnotator)}
    else:
        raise ValueError(f"{__name__} has no backend {backend!r}; it has controlnet_aux and transformers")
