"""Controllability by re-annotation: read each map->image output back into its query's modality and
compare with the query map (`pd_eval.control`), as ControlNet++ measures ControlNets.

What reads an image: the annotator that made the data's maps of that modality (`pd_data.annotate`:
HED, DPT depth, UperNet segmentation, Canny ... in the paper profile), or, for maps rendered from the
procedural scene (the demo's: no annotator can read a picture back), a small reader trained on the train
split (`pd_eval.reader`), cached by what it was trained on. Every row carries the re-annotator's id, as
FID rows carry their feature extractor: numbers from different re-annotators are not comparable.

Beside the models, the same scores for copy-example, the mean image (`baseline/mean-map`) and the
query's own true image (`baseline/true-image`: the ceiling, how well the re-annotator reads real
pictures), and the re-annotator's own test error beside the mean map's (`READER` rows): a re-annotator
that does not beat the mean map by a wide margin makes the metric uninformative, and the report says so.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pd_data.dataset import SplitData
from pd_data.procedural import SEG_PALETTE
from pd_eval.schema import MetricRow
from pd_core.state import atomic_write_bytes
from pd_data.tasks import get_task
from pd_eval.config import EvalConfig
from pd_eval.control import CONTROL_METRICS, summarise
from pd_eval.generation import Request, paths, read_pngs

TRUE_IMAGE = "baseline/true-image"  # the query's own picture: the ceiling of every controllability score
READER = "re-annotator"             # rows of the re-annotator's own test error (task "read:<modality>")
READER_MEAN_MAP = "re-annotator/mean-map"  # ... and of the mean map answering the same test images


class ReAnnotators:
    """modality -> what reads a generated image back into that modality's map, and its id."""

    def __init__(self, annotators: dict[str, str], weights_dir: str | None, train: SplitData, cache: Path | None,
                 steps: int = 600, seed: int = 0):
        from pd_data.annotate import get_annotator

        self.palette: dict[str, object] = {}
        self._read, self._id = {}, {}
        procedural = tuple(m for m, b in annotators.items() if b == "procedural" and m in CONTROL_METRICS)
        for m, backend in annotators.items():
            if m in CONTROL_METRICS and backend != "procedural":
                a = get_annotator(backend, m, Path(weights_dir) if weights_dir else None)
                self._read[m] = lambda imgs, a=a: np.stack([a(i, {}) for i in imgs])
                self._id[m] = f"{a.name}@{a.version}" + (f"+{a.weights_hash[:10]}" if getattr(a, "weights_hash", "") else "")
                if m == "seg":
                    from pd_data.annotator_weights import ADE20K_PALETTE

                    self.palette[m] = ADE20K_PALETTE
        self.reader = demo_reader(train, procedural, cache, steps, seed) if procedural else None
        for m in procedural:
            self._read[m] = lambda imgs, m=m: self.reader.read(imgs, m)
            self._id[m] = self.reader.id
            if m == "seg":
                self.palette[m] = SEG_PALETTE

    def reads(self, modality: str) -> bool:
        return modality in self._read

    def read(self, images: np.ndarray, modality: str) -> np.ndarray:
        return self._read[modality](images)

    def id(self, modality: str) -> str:
        return self._id[modality]


def demo_reader(train: SplitData, modalities: tuple[str, ...], cache: Path | None, steps: int = 600, seed: int = 0):
    """The procedural maps' reader, trained on `train` (or loaded from `cache/readers/<hash>`: the same
    images, maps, modalities, settings and reader code give the same reader)."""
    from pd_eval import reader as reader_mod

    h = hashlib.sha256(f"{sorted(modalities)}|{steps}|{seed}".encode())
    h.update(Path(reader_mod.__file__).read_bytes())
    for i in sorted(train.arrays):
        h.update(i.encode())
        for m in ("image", *modalities):
            h.update(hashlib.sha256(train.arrays[i][m].tobytes()).digest())
    folder = None if cache is None else cache / "readers" / h.hexdigest()[:24]
    if folder is not None and (folder / "DONE").exists():
        return reader_mod.load_reader(folder)
    pairs = reader_mod.split_pairs(train, modalities)
    r = reader_mod.train_reader(pairs, steps=steps, seed=seed,
                                palette=SEG_PALETTE if "seg" in modalities else None)
    if folder is not None:
        r.save(folder)
        atomic_write_bytes(folder / "DONE", r.id.encode())  # written last: a half-saved reader is never loaded
    return r


def controllability_rows(out: Path, reqs: list[Request], data: SplitData, readers: ReAnnotators,
                         cfg: EvalConfig) -> list[MetricRow]:
    """Every map->image request whose query modality a re-annotator reads: its outputs read back and
    scored against the query maps; the ceiling (the true images read back) once per task."""
    from pd_eval.benchmark import metric_row

    rows, ceilings = [], {}
    for r in reqs:
        spec = get_task(r.task)
        if spec.target != "image" or not readers.reads(spec.source):
            continue
        built = [data.prompt(spec, it.example_id, it.query_id) for it in r.items]
        queries = np.stack([p.query for p in built])
        read = readers.read(read_pngs(paths(out, r)), spec.source)
        rows += _rows(r.model_id, r.task, read, queries, readers, spec.source, cfg, metric_row)
        if r.task not in ceilings:
            ceilings[r.task] = _rows(TRUE_IMAGE, r.task, readers.read(np.stack([p.target for p in built]), spec.source),
                                     queries, readers, spec.source, cfg, metric_row)
    return rows + [row for c in ceilings.values() for row in c]


def _rows(model_id, task, read, queries, readers, modality, cfg, metric_row) -> list[MetricRow]:
    scores = summarise(modality, read, queries, readers.palette.get(modality), cfg.bootstrap, cfg.seed)
    return [metric_row(model_id, task, name, v, readers.id(modality), cfg) for name, v in scores.items()]


def reader_rows(readers: ReAnnotators, data: SplitData, train: SplitData, cfg: EvalConfig) -> list[MetricRow]:
    """The demo reader's headline score per modality on this split's real images beside the mean map's
    (task `read:<modality>`); `informative` is 1 when the reader beats the mean map by the margin of
    `pd_eval.reader.reader_quality`, else 0."""
    if readers.reader is None:
        return []
    from pd_eval.benchmark import metric_row
    from pd_eval.metrics import MetricValue
    from pd_eval.reader import mean_maps, reader_quality, split_pairs

    mods = readers.reader.modalities
    pairs = split_pairs(data, mods)
    images = next(iter(pairs.values()))[0]
    q = reader_quality(readers.reader, images, {m: pairs[m][1] for m in mods}, mean_maps(train, mods))
    rows = []
    for m, v in q.items():
        one = lambda x: MetricValue(float(x), float("nan"), float("nan"), v["n"])  # noqa: E731
        rows += [metric_row(READER, f"read:{m}", v["metric"], one(v["reader"]), v["reader_id"], cfg),
                 metric_row(READER_MEAN_MAP, f"read:{m}", v["metric"], one(v["mean_map"]), v["reader_id"], cfg),
                 metric_row(READER, f"read:{m}", "informative", one(v["informative"]), v["reader_id"], cfg)]
    return rows
