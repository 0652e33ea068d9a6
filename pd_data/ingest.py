"""Ingestion: a source's records into image shards and rejects shards, split by group, resumable.

Shard s holds items [s * shard_size, (s + 1) * shard_size) of the source's deterministic listing.
Each shard writes its rejects file and then its images file, both atomically: a shard whose images
file exists is complete, so a rerun after a crash skips it and redoes only the rest.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from pd_data.config import DataConfig
from pd_data.normalize import Reject, normalise_caption, normalise_image, require_utf8
from pd_data.shards import IMAGES_SCHEMA, REJECTS_SCHEMA, png_bytes, read_shards, write_shard
from pd_data.sources import Item, RawRecord, Source, make_source


def split_of(group_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Split by group from a hash: stable when groups are added, no group in two splits."""
    h = hashlib.sha256(f"{seed}:{group_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def _ingest_item(source: Source, item: Item, cfg: DataConfig) -> dict:
    return record_row(item, source.load(item), cfg, source.name)


def record_row(item: Item, rec: RawRecord, cfg: DataConfig, source_name: str) -> dict:
    """A loaded record, normalised into an images-shard row; raises `Reject` for bad input, text that UTF-8
    cannot encode included (checked in every string field before the row can join, and fail, its shard)."""
    caption, repaired = normalise_caption(rec.caption)
    prov = dict(rec.provenance, **({"caption_repaired": True} if repaired else {}))
    text = {"image_id": item.image_id, "group_id": item.group_id, "layout_id": item.layout, "caption": caption,
            "source": source_name, "provenance": json.dumps(prov, sort_keys=True, default=str)}
    require_utf8(text)
    img = normalise_image(rec.image, cfg.resolution, cfg.min_side, cfg.max_pixels)
    return {**text, "split": split_of(item.group_id, cfg.seed, cfg.split_fractions), "image": png_bytes(img),
            "width": cfg.resolution, "height": cfg.resolution}


def reject_row(item: Item, e: Exception) -> dict:
    """The rejects-shard row of an item whose ingestion raised `e`: its `Reject` reason, else `load-error`.
    Text UTF-8 cannot encode is backslash-escaped, so writing the rejects never fails."""
    reason, detail = (e.reason, e.detail) if isinstance(e, Reject) else ("load-error", f"{type(e).__name__}: {e}"[:500])
    row = {"image_id": item.image_id, "ref": str(item.ref), "stage": "ingest", "reason": reason, "detail": detail}
    return {k: v.encode("utf-8", "backslashreplace").decode("utf-8") for k, v in row.items()}


def duplicate_check(item: Item, duplicate: bool) -> None:
    """The listing's duplicate flag as a reject: the first occurrence of an id wins."""
    if duplicate:
        raise Reject("duplicate-id", f"{item.image_id} appears earlier in the source")


Listing = tuple[list[Item], list[bool]]


def listing(source: Source) -> Listing:
    """The source's items and, for each, whether its id appeared earlier (the first occurrence wins).

    Made once per run and handed to every shard: listing a folder source walks the whole folder.
    """
    items, seen, duplicate = source.items(), set(), []
    for it in items:
        duplicate.append(it.image_id in seen)
        seen.add(it.image_id)
    return items, duplicate


def count_shards(cfg: DataConfig, listed: Listing) -> int:
    return -(-len(listed[0]) // cfg.shard_size)


def ingest_shard(cfg: DataConfig, s: int, out_dir: Path, listed: Listing, source: Source | None = None) -> dict:
    """Write shard s (its rejects, then its images); a shard already written is kept as it is."""
    path = out_dir / f"images-{s:05d}.parquet"
    if path.exists():
        return {"shard": s, "resumed": True}
    source = source or make_source(cfg)
    items, duplicate = listed
    rows, rejects = [], []
    for i in range(s * cfg.shard_size, min(len(items), (s + 1) * cfg.shard_size)):
        item = items[i]
        try:
            duplicate_check(item, duplicate[i])
            rows.append(_ingest_item(source, item, cfg))
        except Exception as e:  # noqa: BLE001 - one bad record never kills the run
            rejects.append(reject_row(item, e))
    write_shard(out_dir / f"rejects-{s:05d}.parquet", rejects, REJECTS_SCHEMA)
    write_shard(path, rows, IMAGES_SCHEMA)  # last: its presence marks the shard complete
    return {"shard": s, "resumed": False}


def summarise(out_dir: Path, source_name: str, rows_in: int, resumed: int, seconds: float) -> dict:
    images = read_shards(out_dir, "images") if rows_in else None
    rej = read_shards(out_dir, "rejects").column("reason").to_pylist() if rows_in else []
    return {"source": source_name, "rows_in": rows_in, "rows_out": images.num_rows if images is not None else 0,
            "rejects": dict(sorted(Counter(rej).items())), "shards": len(list(out_dir.glob("images-*.parquet"))),
            "shards_resumed": resumed, "seconds": round(seconds, 2)}


def prepare(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp"):  # left by a write that was killed before its rename
        stale.unlink()


def ingest(cfg: DataConfig, out_dir: Path, source: Source | None = None) -> dict:
    """Every shard in this process, in order; returns the run's summary (rows, rejects by reason, time)."""
    t0 = time.perf_counter()
    source = source or make_source(cfg)
    prepare(out_dir)
    listed = listing(source)
    n = count_shards(cfg, listed)
    done = [ingest_shard(cfg, s, out_dir, listed, source) for s in tqdm(range(n), desc=f"ingest {source.name}", unit="shard")]
    return summarise(out_dir, source.name, len(listed[0]), sum(d["resumed"] for d in done), time.perf_counter() - t0)
