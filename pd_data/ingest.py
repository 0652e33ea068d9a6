"""Ingestion: a source's records into image shards, with a deterministic split by group."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from pd_data import procedural
from pd_data.config import DataConfig
from pd_data.shards import IMAGES_SCHEMA, png_bytes, write_shard


@dataclass(frozen=True)
class Record:
    image_id: str
    group_id: str
    caption: str
    image_png: bytes
    width: int
    height: int
    source: str
    provenance: str


def split_of(group_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Split by group from a hash: stable when groups are added, no group in two splits."""
    h = hashlib.sha256(f"{seed}:{group_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def procedural_records(cfg: DataConfig, groups: range) -> Iterator[Record]:
    for g in groups:
        group_seed = cfg.seed * 1_000_003 + g
        for k, (scene, text) in enumerate(procedural.make_group(group_seed, cfg.images_per_group)):
            img = procedural.render(scene, cfg.resolution, texture_seed=group_seed)["image"]
            prov = json.dumps({"scene": scene, "texture_seed": group_seed}, sort_keys=True)
            yield Record(f"g{g:06d}-{k}", f"g{g:06d}", text, png_bytes(img), cfg.resolution,
                         cfg.resolution, "procedural", prov)


def ingest(cfg: DataConfig, out_dir: Path) -> dict:
    """Write `images-NNNNN.parquet` shards to `out_dir`; shards already written are kept (resume)."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    groups_per_shard = max(1, cfg.shard_size // cfg.images_per_group)
    n_shards = -(-cfg.n_groups // groups_per_shard)
    rows_out, skipped = 0, 0
    for s in tqdm(range(n_shards), desc="ingest shards", unit="shard"):
        path = out_dir / f"images-{s:05d}.parquet"
        groups = range(s * groups_per_shard, min(cfg.n_groups, (s + 1) * groups_per_shard))
        if path.exists():  # atomically written earlier: complete by construction
            skipped += 1
            rows_out += len(groups) * cfg.images_per_group
            continue
        rows = [{
            "image_id": r.image_id, "group_id": r.group_id,
            "split": split_of(r.group_id, cfg.seed, cfg.split_fractions),
            "caption": r.caption, "image": r.image_png, "width": r.width, "height": r.height,
            "source": r.source, "provenance": r.provenance,
        } for r in procedural_records(cfg, groups)]
        write_shard(path, rows, IMAGES_SCHEMA)
        rows_out += len(rows)
    return {"rows_out": rows_out, "shards": n_shards, "shards_resumed": skipped,
            "seconds": round(time.perf_counter() - t0, 2)}
