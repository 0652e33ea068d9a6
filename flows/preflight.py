"""Preflight: every input a profile reads from disk, checked before any stage (or Prefect) starts.

`missing_inputs(profile)` lists each data folder, captions file, annotator weight file, base model
folder and FID weight file that the run will need and cannot find, with where to put it: what
`pd check` prints and what `pd run` and every flow refuse to start without. Nothing is loaded, so it
takes well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.profiles import Profile


@dataclass(frozen=True)
class Missing:
    what: str  # e.g. "InstructPix2Pix data (data.source_path)"
    detail: str  # the path expected and where to put it

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


def _source(profile: Profile) -> list[Missing]:
    d = profile.data
    if d.source == "procedural":
        return []
    if not d.source_path:
        return [Missing("data.source_path", f"data.source={d.source!r} reads a path; set data.source_path")]
    root = Path(d.source_path).expanduser()
    out = []
    if d.source == "folder" and not root.is_dir():
        out.append(Missing("image folder (data.source_path)", f"{root} is not a folder; put your images there or set "
                           "data.source_path"))
    if d.source == "instructpix2pix" and not (root / "seeds.json").is_file():
        out.append(Missing("InstructPix2Pix data (data.source_path)", f"{root / 'seeds.json'} not found; unpack the "
                           "InstructPix2Pix dataset (its folder holding seeds.json and one folder per prompt) there, "
                           "or set data.source_path (a Hugging Face Parquet export: data.source=parquet, "
                           "data.parquet_preset=instructpix2pix-hf)"))
    if d.source == "parquet" and not (root.is_file() or (root.is_dir() and next(root.glob("*.parquet"), None))):
        out.append(Missing("Parquet data (data.source_path)", f"no .parquet file at {root}; set data.source_path to a "
                           "Parquet file or a folder of them"))
    if d.source == "folder" and d.captions_file and not Path(d.captions_file).expanduser().is_file():
        out.append(Missing("captions file (data.captions_file)", f"{Path(d.captions_file).expanduser()} not found; "
                           "set data.captions_file to a JSONL or CSV file, or unset it to read a .txt beside each image"))
    return out


def _annotators(profile: Profile) -> list[Missing]:
    d = profile.data
    out = []
    for modality, backend in d.annotators.items():
        if backend == "procedural":
            continue
        try:
            from pd_data import annotator_weights

            annotator_weights.resolve_weights(backend, modality, d.annotator_weights)
        except ImportError as e:
            out.append(Missing(f"annotator {backend}:{modality}", f"its package is not installed ({e}); "
                               "run `make install`"))
        except (FileNotFoundError, ValueError) as e:
            out.append(Missing(f"annotator weights for {modality} ({backend}, data.annotator_weights)", str(e)))
    return out


def _base(profile: Profile) -> list[Missing]:
    b = profile.base
    if b.kind != "sd15":
        return []
    folder = Path(b.pretrained_path).expanduser()
    if not folder.exists():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(b.pretrained_path, local_files_only=True))
        except Exception:  # noqa: BLE001 - offline and not cached
            return [Missing("Stable Diffusion 1.5 (base.pretrained_path)", f"{folder} not found; put the diffusers "
                            "folder of Stable Diffusion 1.5 there (model_index.json, unet/, vae/, text_encoder/, "
                            "tokenizer/, scheduler/) or set base.pretrained_path")]
    need = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
            "tokenizer"]
    lacking = [n for n in need if not (folder / n).exists()]
    lacking += [f"{m}/ weights (*.safetensors or *.bin)" for m in ("unet", "vae", "text_encoder")
                if (folder / m).is_dir() and not any((folder / m).glob("*.safetensors")) and not any((folder / m).glob("*.bin"))]
    return [Missing("Stable Diffusion 1.5 (base.pretrained_path)", f"{folder} lacks {', '.join(lacking)}; it must "
                    "be the diffusers layout of Stable Diffusion 1.5")] if lacking else []


def _fid(profile: Profile) -> list[Missing]:
    if profile.eval.protocol != "paper":
        return []
    from pd_eval.features import INCEPTION_FILE, inception_path

    if inception_path() is None:
        return [Missing("Inception-v3 for FID (eval.protocol=paper)", f"{INCEPTION_FILE} not found; put clean-fid's "
                        "TorchScript Inception file in $PD_INCEPTION_DIR or /tmp")]
    return []


def missing_inputs(profile: Profile) -> list[Missing]:
    """Every input of `profile` that is not where the run will look for it."""
    return _source(profile) + _annotators(profile) + _base(profile) + _fid(profile)


def require_inputs(profile: Profile) -> None:
    """Raise `FileNotFoundError` listing every missing input (the start of every run)."""
    missing = missing_inputs(profile)
    if missing:
        raise FileNotFoundError(f"profile {profile.name!r} cannot start; {len(missing)} input(s) missing "
                                "(`pd check` lists them):\n" + "\n".join(f"  - {m}" for m in missing))
