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

Where their weights are found: `pd_data.annotator_weights`.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from pd_data.annotator_weights import (ADE20K_PALETTE, AUX_SPECS, hash_weights, resolve_aux_weights,
                                       resolve_hf_folder, weight_files)

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
        return cls(model, cls.load_processor(folder, model), hash_weights(weight_files(folder)), device)

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
