"""Annotators: one signature, a registry by modality; each map records how it was made."""
from __future__ import annotations

import functools
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pyarrow.parquet as pq

from pd_data import procedural
from pd_data.shards import ANNOTATIONS_SCHEMA, png_bytes, write_shard


class Annotator(Protocol):
    name: str
    version: str
    weights_hash: str

    def __call__(self, image: np.ndarray, provenance: dict) -> np.ndarray: ...


@dataclass(frozen=True)
class ProceduralAnnotator:
    """Exact maps, re-rendered from the scene description that drew the image."""

    modality: str
    name: str = "procedural"
    version: str = "1"
    weights_hash: str = ""

    def __call__(self, image: np.ndarray, provenance: dict) -> np.ndarray:
        if "scene" not in provenance:
            raise ValueError("the procedural annotator needs a procedural source (no scene in provenance)")
        maps = procedural.render(provenance["scene"], image.shape[0], provenance["texture_seed"])
        return maps[self.modality]


AnnotatorFactory = Callable[[Path | None], Annotator]

# Backends with heavy imports (controlnet-aux takes ~5 s), registered when first asked for:
# backend -> (module whose `register(registry, backend)` adds it, the pip package it needs).
OPTIONAL_BACKENDS: dict[str, tuple[str, str]] = {
    "controlnet_aux": ("pd_data.annotators_ext", "controlnet-aux"),
    "transformers": ("pd_data.annotators_ext", "transformers"),
}


class AnnotatorRegistry(dict):
    """backend -> modality -> factory(weights_dir) -> Annotator. Looking up an optional backend that is
    not registered yet registers it, so a missing package fails there, naming what to install."""

    def __missing__(self, backend: str) -> dict[str, AnnotatorFactory]:
        if backend not in OPTIONAL_BACKENDS:
            raise KeyError(backend)
        module, package = OPTIONAL_BACKENDS[backend]
        try:
            importlib.import_module(module).register(self, backend)
        except ImportError as e:
            raise ImportError(f"annotator backend {backend!r} needs the package {package!r}, which is not "
                              f"installed ({e}); install it with `pip install {package}`") from e
        return self[backend]


ANNOTATORS = AnnotatorRegistry(
    procedural={m: (lambda weights_dir, m=m: ProceduralAnnotator(m)) for m in procedural.MODALITIES})


def known_backends() -> list[str]:
    """Every backend name get_annotator accepts: registered ones and optional ones not loaded yet."""
    return sorted({*ANNOTATORS, *OPTIONAL_BACKENDS})


@functools.lru_cache(maxsize=16)
def get_annotator(backend: str, modality: str, weights_dir: Path | None = None) -> Annotator:
    """One instance per (backend, modality, weights) and process: networks load once, not per shard."""
    if backend not in known_backends():
        raise ValueError(f"unknown annotator backend {backend!r}; known: {', '.join(known_backends())}")
    modalities = ANNOTATORS[backend]  # registers an optional backend; ImportError names its package
    if modality not in modalities:
        raise ValueError(f"no annotator for modality {modality!r} in backend {backend!r}; "
                         f"known: {', '.join(sorted(modalities))}")
    return modalities[modality](weights_dir)


BATCH = 16  # images per call of an annotator that takes batches (`batch(images)`: the networks on a GPU)


def _checked(a: Annotator, img: np.ndarray, out: np.ndarray) -> np.ndarray:
    if out.shape != img.shape or out.dtype != np.uint8:
        raise ValueError(f"{a.name} returned {out.shape} {out.dtype}, expected {img.shape} uint8")
    return out


def _annotate_all(a: Annotator, images: list[np.ndarray], provs: list[dict]) -> list:
    """Each image's map, or the exception it raised. An annotator with `batch(images)` gets them BATCH
    at a time; a batch that fails is redone image by image, so only the bad image is lost."""
    out: list = []
    step = BATCH if hasattr(a, "batch") else 1
    for s in range(0, len(images), step):
        chunk = range(s, min(s + step, len(images)))
        if step > 1:
            try:
                res = a.batch([images[i] for i in chunk])
                if len(res) == len(chunk):
                    out += [_checked(a, images[i], m) for i, m in zip(chunk, res)]
                    continue
            except Exception:  # noqa: BLE001 - find the image that failed, one at a time
                pass
        for i in chunk:
            try:
                out.append(_checked(a, images[i], a(images[i], provs[i])))
            except Exception as e:  # noqa: BLE001
                out.append(e)
    return out


def annotate_shard(images_path: Path, out_path: Path, annotators: dict[str, str],
                   weights_dir: Path | None = None) -> dict:
    """Annotate every image of one shard with every modality; an existing output is kept (resume).

    A map that fails is a reject (stage "annotate"), not a crash; its rejects file is written
    before the annotations file, whose presence marks the shard complete.
    """
    if out_path.exists():
        return {"shard": images_path.name, "rows": pq.read_metadata(out_path).num_rows, "resumed": True, "rejects": 0}
    t0 = time.perf_counter()
    from pd_data.shards import REJECTS_SCHEMA, decode_image

    table = pq.read_table(images_path, columns=["image_id", "image", "provenance"]).to_pylist()
    built = {m: get_annotator(b, m, weights_dir) for m, b in annotators.items()}
    images = [decode_image(r["image"]) for r in table]
    provs = [json.loads(r["provenance"]) for r in table]
    maps: dict[str, list] = {m: _annotate_all(a, images, provs) for m, a in built.items()}
    rows, rejects = [], []
    for k, r in enumerate(table):
        for m, a in built.items():
            out = maps[m][k]
            if isinstance(out, Exception):  # one bad image never kills the shard
                rejects.append({"image_id": r["image_id"], "ref": images_path.name, "stage": "annotate",
                                "reason": f"annotator-error:{m}", "detail": f"{type(out).__name__}: {out}"[:500]})
                continue
            rows.append({"image_id": r["image_id"], "modality": m, "map": png_bytes(out),
                         "annotator": a.name, "annotator_version": a.version, "weights_hash": a.weights_hash})
    write_shard(out_path.with_name(out_path.name.replace("annotations-", "rejects-")), rejects, REJECTS_SCHEMA)
    write_shard(out_path, rows, ANNOTATIONS_SCHEMA)
    return {"shard": images_path.name, "rows": len(rows), "resumed": False, "rejects": len(rejects),
            "seconds": round(time.perf_counter() - t0, 2)}
