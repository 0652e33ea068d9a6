"""In-memory view of a split: images, their maps and captions, grouped into layouts and groups; which
image gives a query its example pair (`data.pairing`), and prompt sampling from it."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pd_data.config import Pairing
from pd_data.shards import decode_png, read_shards
from pd_data.tasks import Prompt, TaskSpec, compose_prompt


@dataclass
class SplitData:
    """`arrays[image_id][modality]` is an (H, W, 3) uint8 array; "image" is the photo itself.

    `layouts[image_id]` names the picture an image is an edited twin of (absent: the image alone);
    `pairing` says which images may give a query its example pair (see `partners`)."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    pairing: Pairing = "other-layout"
    _names: tuple[dict, list[str]] | None = field(default=None, repr=False)

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


def load_split(images_dir: Path, annotations_dir: Path, split: str, pairing: Pairing = "other-layout") -> SplitData:
    return split_from_tables(read_shards(images_dir, "images"), read_shards(annotations_dir, "annotations"), split,
                             where=str(images_dir), pairing=pairing)


def split_from_tables(images: pa.Table, ann: pa.Table, split: str, where: str = "the dataset",
                      pairing: Pairing = "other-layout") -> SplitData:
    """One split of an images table and its annotations table (both in the shard schemas)."""
    images = images.filter(pc.equal(images["split"], split))
    if images.num_rows == 0:
        raise ValueError(f"split {split!r} has no images in {where}; adjust data.split_fractions or data.n_groups")
    keep = set(images["image_id"].to_pylist())
    out = SplitData(pairing=pairing)
    groups: dict[str, list[str]] = defaultdict(list)
    for r in images.to_pylist():
        out.arrays[r["image_id"]] = {"image": decode_png(r["image"])}
        out.captions[r["image_id"]] = r["caption"]
        out.layouts[r["image_id"]] = r.get("layout_id") or r["image_id"]  # shards before layouts: the image alone
        groups[r["group_id"]].append(r["image_id"])
    out.groups = {g: sorted(ids) for g, ids in groups.items()}
    modalities = set(ann.column("modality").to_pylist())
    for r in ann.select(["image_id", "modality", "map"]).to_pylist():
        if r["image_id"] in keep:
            out.arrays[r["image_id"]][r["modality"]] = decode_png(r["map"])
    # An image with a rejected map takes part in no prompt: every task sees the same images.
    incomplete = {i for i, a in out.arrays.items() if not modalities <= set(a)}
    for i in incomplete:
        del out.arrays[i], out.captions[i]
    out.groups = {g: [i for i in ids if i not in incomplete] for g, ids in out.groups.items()}
    return out
