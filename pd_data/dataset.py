"""A split's images, their maps and captions, grouped into layouts and groups; which image gives a
query its example pair (`data.pairing`), and prompt sampling from it.

`load_split` reads only the small columns of the shards (ids, groups, layouts, captions, which maps
exist) and decodes pixels on demand: `arrays[image_id][modality]` reads the row group holding that
PNG and keeps the decoded array in a bounded cache, so memory does not grow with the dataset and a
training process (or loader worker) reads only what its own samples need.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pd_data.config import Pairing, more_data
from pd_data.shards import decode_image, shard_files
from pd_data.tasks import Prompt, TaskSpec, compose_prompt

DEFAULT_CACHE_MB = 256.0


class ShardColumn:
    """Random access to one image column of a list of Parquet files by (file, row).

    A read fetches the row group holding the row (shards are written in small row groups, see
    `pd_data.shards.ROW_GROUP_ROWS`); the last few row groups and open files are kept. Picklable:
    a copy (a DataLoader worker) starts with empty caches and opens its own files."""

    def __init__(self, files: list[str], starts: list[list[int]], column: str, keep: int = 4):
        self.files, self.starts, self.column, self.keep = files, starts, column, keep
        self._open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict(), "_groups": OrderedDict()}

    def get(self, f: int, row: int) -> dict | bytes:
        rg = bisect.bisect_right(self.starts[f], row) - 1
        col = self._groups.get((f, rg))
        if col is None:
            if f not in self._open:
                self._open[f] = pq.ParquetFile(self.files[f])
                while len(self._open) > 16:
                    self._open.popitem(last=False)
            col = self._open[f].read_row_group(rg, columns=[self.column]).column(0).combine_chunks()
            self._groups[(f, rg)] = col
            while len(self._groups) > self.keep:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end((f, rg))
        return col[row - self.starts[f][rg]].as_py()


class LazyArrays(Mapping):
    """`arrays[image_id]` -> {"image" | modality: (H, W, 3) uint8}, decoded on first use; decoded
    arrays are kept in an LRU cache of at most `cache_mb` MB (per process)."""

    def __init__(self, ids: list[str], image_loc: np.ndarray, map_loc: np.ndarray, modalities: tuple[str, ...],
                 images: ShardColumn, maps: ShardColumn | None, cache_mb: float = DEFAULT_CACHE_MB):
        self._ids, self._image_loc, self._map_loc = ids, image_loc, map_loc
        self._pos = {i: k for k, i in enumerate(ids)}
        self._mod = {m: j for j, m in enumerate(modalities)}
        self.modalities, self._images, self._maps = modalities, images, maps
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._cached = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict(), "_cached": 0}

    def __getitem__(self, image_id: str) -> "ImageArrays":
        return ImageArrays(self, self._pos[image_id])

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._pos

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def decode(self, k: int, modality: str) -> np.ndarray:
        key = (k, modality)
        arr = self._cache.get(key)
        if arr is not None:
            self._cache.move_to_end(key)
            return arr
        if modality == "image":
            arr = decode_image(self._images.get(*self._image_loc[k]))
        else:
            arr = decode_image(self._maps.get(*self._map_loc[k, self._mod[modality]]))
        arr.setflags(write=False)  # shared by every prompt that uses it
        self._cache[key] = arr
        self._cached += arr.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return arr


class ImageArrays(Mapping):
    """One image's photo and maps, each decoded when first read."""

    def __init__(self, owner: LazyArrays, k: int):
        self._owner, self._k = owner, k

    def __getitem__(self, modality: str) -> np.ndarray:
        if modality != "image" and modality not in self._owner._mod:
            raise KeyError(modality)
        return self._owner.decode(self._k, modality)

    def __iter__(self):
        return iter(("image", *self._owner.modalities))

    def __len__(self) -> int:
        return 1 + len(self._owner.modalities)


@dataclass
class SplitData:
    """`arrays[image_id][modality]` is an (H, W, 3) uint8 array; "image" is the photo itself (a dict,
    or the `LazyArrays` of `load_split`).

    `layouts[image_id]` names the picture an image is an edited twin of (absent: the image alone);
    `pairing` says which images may give a query its example pair (see `partners`)."""

    arrays: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    pairing: Pairing = "other-layout"
    source: str | None = None  # the source that made the images (`data.source`), for the fixes errors suggest
    _names: tuple[dict, list[str]] | None = field(default=None, repr=False)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The maps every image has (the annotated modalities)."""
        if isinstance(self.arrays, LazyArrays):
            return self.arrays.modalities
        keys = [set(a) - {"image"} for a in self.arrays.values()]
        return tuple(sorted(set.intersection(*keys))) if keys else ()

    def layout_of(self, image_id: str) -> str:
        return self.layouts.get(image_id, image_id)

    @property
    def group_names(self) -> list[str]:
        """The groups holding at least one image, sorted (cached until `groups` is replaced)."""
        if self._names is None or self._names[0] is not self.groups:  # the dict itself: an id could be reused
            self._names = (self.groups, sorted(g for g, ids in self.groups.items() if ids))
        return self._names[1]

    def partners(self, group: str, query_id: str) -> list[str]:
        """The images of the query's group that may give its example pair: `other-layout`, those of
        another layout (never the query's own twins); `any`, every other image; `other-group`, none.
        A query without partners takes its example from another group."""
        if self.pairing == "other-group":
            return []
        ids = self.groups[group]
        if self.pairing == "any":
            return [i for i in ids if i != query_id]
        own = self.layout_of(query_id)
        return [i for i in ids if self.layout_of(i) != own]

    def draw_pair(self, rng: np.random.Generator) -> tuple[str, str]:
        """(example_id, query_id): a group, then a query in it, uniformly; the example uniformly among
        the query's partners, else an image of another group drawn uniformly."""
        groups = self.group_names
        gi = int(rng.integers(len(groups)))
        g = groups[gi]
        ids = self.groups[g]
        query = ids[int(rng.integers(len(ids)))]
        candidates = self.partners(g, query)
        if not candidates:
            if len(groups) < 2:
                raise ValueError(f"no example pair for {query!r}: its group {g!r} is the only one and has no image that "
                                 f"data.pairing={self.pairing!r} allows; add images or groups, or set data.pairing")
            k = int(rng.integers(len(groups) - 1))
            candidates = self.groups[groups[k + (k >= gi)]]  # any group but g
        return candidates[int(rng.integers(len(candidates)))], query

    def has_pairs(self) -> bool:
        """Whether `draw_pair` can return anything: a group with a partner, or two groups."""
        groups = self.group_names
        return len(groups) > 1 or any(self.partners(g, q) for g in groups for q in self.groups[g])

    def pair_count(self) -> int:
        """How many distinct (example, query) pairs `draw_pair` can return."""
        groups = self.group_names
        total = sum(len(self.groups[g]) for g in groups)
        n = 0
        for g in groups:
            for q in self.groups[g]:
                own = len(self.partners(g, q))
                n += own if own else (total - len(self.groups[g]) if len(groups) > 1 else 0)
        return n

    def all_pairs(self) -> list[tuple[str, str]]:
        """Every (example, query) pair `draw_pair` can return, in a fixed order (for small splits)."""
        groups = self.group_names
        out = []
        for g in groups:
            for q in self.groups[g]:
                own = self.partners(g, q)
                others = [] if own or len(groups) < 2 else [i for h in groups if h != g for i in self.groups[h]]
                out += [(e, q) for e in own or others]
        return out

    def prompt(self, spec: TaskSpec, example_id: str, query_id: str) -> Prompt:
        return compose_prompt(spec, self.arrays[example_id], self.arrays[query_id], self.captions[query_id])

    def sample_prompt(self, spec: TaskSpec, rng: np.random.Generator) -> Prompt:
        """A prompt of `spec` on a pair from `draw_pair`: example pair from one image, query and target from another."""
        return self.prompt(spec, *self.draw_pair(rng))


def load_split(images_dir: Path, annotations_dir: Path, split: str, pairing: Pairing = "other-layout",
               cache_mb: float = DEFAULT_CACHE_MB) -> SplitData:
    """One split of a stage's shards with lazily decoded arrays (see `LazyArrays`); an image missing a
    map that other images have (a rejected map) takes part in no prompt, so every task sees the same
    images."""
    img_files, ann_files = shard_files(images_dir, "images"), shard_files(annotations_dir, "annotations")
    rows: list[tuple[str, str, str, str, int, int]] = []  # (id, group, layout, caption, file, row)
    img_starts, ann_starts = [], []  # per file, the first row of each row group (one footer read per file)
    source: str | None = None
    for f, path in enumerate(img_files):
        pf = pq.ParquetFile(path)
        img_starts.append(_row_group_starts(pf.metadata))
        names = pf.schema_arrow.names
        t = pf.read(columns=["image_id", "group_id", "split", "caption"] + [c for c in ("layout_id", "source") if c in names])
        source = source or (t["source"][0].as_py() if "source" in names and t.num_rows else None)
        keep = np.flatnonzero(np.asarray(pc.equal(t["split"], split).to_numpy(zero_copy_only=False), bool))
        ids, groups, caps = (t[c].to_pylist() for c in ("image_id", "group_id", "caption"))
        layouts = t["layout_id"].to_pylist() if "layout_id" in names else [None] * t.num_rows
        rows += [(ids[r], groups[r], layouts[r] or ids[r], caps[r], f, int(r)) for r in keep]
    if not rows:
        raise ValueError(f"split {split!r} has no images in {images_dir}; adjust data.split_fractions or {more_data(source)}")
    in_split = {r[0] for r in rows}
    found: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    modalities: set[str] = set()
    for f, path in enumerate(ann_files):
        pf = pq.ParquetFile(path)
        ann_starts.append(_row_group_starts(pf.metadata))
        t = pf.read(columns=["image_id", "modality"])
        modalities |= set(t["modality"].unique().to_pylist())  # over every split, as a rejected map is anywhere
        for r, (i, m) in enumerate(zip(t["image_id"].to_pylist(), t["modality"].to_pylist())):
            if i in in_split:
                found[i][m] = (f, r)
    mods = tuple(sorted(modalities))
    complete = [r for r in rows if len(found.get(r[0], ())) == len(mods)]
    image_loc = np.array([(r[4], r[5]) for r in complete], np.int64).reshape(-1, 2)
    map_loc = np.array([[found[r[0]][m] for m in mods] for r in complete], np.int64).reshape(-1, len(mods), 2)
    arrays = LazyArrays([r[0] for r in complete], image_loc, map_loc, mods,
                        ShardColumn([str(p) for p in img_files], img_starts, "image"),
                        ShardColumn([str(p) for p in ann_files], ann_starts, "map") if ann_files else None,
                        cache_mb)
    out = SplitData(arrays=arrays, pairing=pairing, source=source)
    groups: dict[str, list[str]] = defaultdict(list)
    for r in complete:
        out.captions[r[0]] = r[3]
        out.layouts[r[0]] = r[2]
        groups[r[1]].append(r[0])
    out.groups = {g: sorted(ids) for g, ids in groups.items()}
    for r in rows:  # a group whose images all lack a map is still listed, empty (as before)
        out.groups.setdefault(r[1], [])
    return out


def _row_group_starts(md: pq.FileMetaData) -> list[int]:
    """The first row of each row group of one file."""
    return np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])[:-1].tolist()


def split_from_tables(images: pa.Table, ann: pa.Table, split: str, where: str = "the dataset",
                      pairing: Pairing = "other-layout") -> SplitData:
    """One split of an images table and its annotations table (both in the shard schemas)."""
    source = images["source"][0].as_py() if "source" in images.column_names and images.num_rows else None
    images = images.filter(pc.equal(images["split"], split))
    if images.num_rows == 0:
        raise ValueError(f"split {split!r} has no images in {where}; adjust data.split_fractions or {more_data(source)}")
    keep = set(images["image_id"].to_pylist())
    out = SplitData(pairing=pairing, source=source)
    groups: dict[str, list[str]] = defaultdict(list)
    for r in images.to_pylist():
        out.arrays[r["image_id"]] = {"image": decode_image(r["image"])}
        out.captions[r["image_id"]] = r["caption"]
        out.layouts[r["image_id"]] = r.get("layout_id") or r["image_id"]  # shards before layouts: the image alone
        groups[r["group_id"]].append(r["image_id"])
    out.groups = {g: sorted(ids) for g, ids in groups.items()}
    modalities = set(ann.column("modality").to_pylist())
    for r in ann.select(["image_id", "modality", "map"]).to_pylist():
        if r["image_id"] in keep:
            out.arrays[r["image_id"]][r["modality"]] = decode_image(r["map"])
    # An image with a rejected map takes part in no prompt: every task sees the same images.
    incomplete = {i for i, a in out.arrays.items() if not modalities <= set(a)}
    for i in incomplete:
        del out.arrays[i], out.captions[i]
    out.groups = {g: [i for i in ids if i not in incomplete] for g, ids in out.groups.items()}
    return out
