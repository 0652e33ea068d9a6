"""Where the annotators' weights are found, and what they are: local files only, never downloaded.

One ``data.annotator_weights`` folder serves every annotator::

    <data.annotator_weights>/
        ControlNetHED.pth  dpt_hybrid-midas-501f0c75.pt  scannet.pt  ...   (controlnet_aux)
        upernet-convnext-small/{config.json, preprocessor_config.json, model.safetensors}
        dpt-hybrid-midas/{config.json, model.safetensors[, preprocessor_config.json]}

Where weights are looked for, in order; the first that is set is the only place looked in (no
silent fallback to another copy): ``data.annotator_weights`` (the ``weights_dir`` argument); for a
transformers model, ``$PD_SEG_WEIGHTS`` / ``$PD_DEPTH_WEIGHTS`` naming its folder itself;
``$PD_ANNOTATOR_WEIGHTS``, read as ``data.annotator_weights`` is; the local Hugging Face cache of
the repo, looked up with ``local_files_only=True``. A missing file is an error naming it, the folder
it must go in and the setting. The backends that load them: `pd_data.annotators_ext`.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


_WEIGHTS_HINT = "model.safetensors (or pytorch_model.bin)"


def weight_files(folder: Path) -> list[Path]:
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
    missing += [] if weight_files(folder) else [_WEIGHTS_HINT]
    if missing:
        err = _missing_weights(modality, missing, found, spec.repo, spec.subfolder, spec.env)
        if not folder.is_dir() and (folder.parent / "config.json").is_file():  # the model folder itself was named
            err.args = (f"{err} ({folder.parent} is itself a model folder: set {SETTING} to the folder above it)",)
        raise err
    return folder


def resolve_weights(backend: str, modality: str, weights_dir: Path | str | None = None) -> list[Path]:
    """The weight files one registered annotator would load, found without loading anything (for a
    preflight): [] for weight-free ones; FileNotFoundError naming data.annotator_weights if absent."""
    if backend == "controlnet_aux" and modality in AUX_SPECS:
        return resolve_aux_weights(modality, weights_dir) if AUX_SPECS[modality].files else []
    if backend == "transformers" and modality in HF_SPECS:
        return weight_files(resolve_hf_folder(modality, weights_dir))
    raise ValueError(f"no {backend!r} annotator for {modality!r}; known: controlnet_aux {sorted(AUX_SPECS)}, "
                     f"transformers {sorted(HF_SPECS)}")
