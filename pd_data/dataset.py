"""In-memory view of a split: images, their maps and captions, grouped; prompt sampling from it."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pd_data.shards import decode_png, read_shards
from pd_data.tasks import Prompt, TaskSpec, compose_prompt


@dataclass
class SplitData:
    """`arrays[image_id][modality]` is an (H, W, 3) uint8 array; "image" is the photo itself."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def multi_image_groups(self) -> list[str]:
        return sorted(g for g, ids in self.groups.items() if len(ids) >= 2)

    def prompt(self, spec: TaskSpec, example_id: str, query_id: str) -> Prompt:
        return compose_prompt(spec, self.arrays[example_id], self.arrays[query_id], self.captions[query_id])

    def sample_prompt(self, spec: TaskSpec, rng: np.random.Generator) -> Prompt:
        """Example pair from one image of a random group, query and target from another."""
        groups = self.multi_image_groups
        ids = self.groups[groups[int(rng.integers(len(groups)))]]
        a, b = rng.choice(len(ids), size=2, replace=False)
        return self.prompt(spec, ids[int(a)], ids[int(b)])


def load_split(images_dir: Path, annotations_dir: Path, split: str) -> SplitData:
    return split_from_tables(read_shards(images_dir, "images"), read_shards(annotations_dir, "annotations"), split,
                             where=str(images_dir))


def split_from_tables(images: pa.Table, ann: pa.Table, split: str, where: str = "the dataset") -> SplitData:
    """One split of an images table and its annotations table (both in the shard schemas)."""
    images = images.filter(pc.equal(images["split"], split))
    if images.num_rows == 0:
        raise ValueError(f"split {split!r} has no images in {where}; adjust data.split_fractions or data.n_groups")
    keep = set(images["image_id"].to_pylist())
    out = SplitData()
    groups: dict[str, list[str]] = defaultdict(list)
    for r in images.to_pylist():
        out.arrays[r["image_id"]] = {"image": decode_png(r["image"])}
        out.captions[r["image_id"]] = r["caption"]
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
