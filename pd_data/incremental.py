"""Incremental ingestion for scheduled retraining: a live dataset that grows round by round.

A round lists the source, hashes every record's content, and writes and annotates only the items
that are new or changed (shards `images-rNNNN-SSSSS.parquet` and their annotations); items gone
from the source are marked deleted. Which version of each item belongs to the dataset is tracked
in DuckDB (`source_items`, `data_rounds`), so training reads the latest version of every active
item and never a deleted or rejected one. A round's files are written before its rows are
committed; files of a round that never committed (a crash) are removed by the next round.
"""
from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pd_data.annotate import annotate_shard
from pd_data.config import DataConfig, Pairing
from pd_data.dataset import SplitData, split_from_tables
from pd_core.db import connect
from pd_data.ingest import duplicate_check, listing, prepare, record_row, reject_row
from pd_data.shards import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA, REJECTS_SCHEMA, with_image_structs, write_shard
from pd_data.sources import RawRecord, make_source
from pd_data.schema import DataRoundRow, ensure_schema
from pd_core.state import fingerprint

_ROUND_FILE = re.compile(r"-r(\d{4})-\d{5}\.parquet$")
# What may change between rounds without invalidating earlier rounds: how much data and how it is read.
_ROUND_INVARIANT = {"n_groups", "layouts_per_group", "images_per_layout", "shard_size", "workers", "dask_address",
                    "gpu_workers", "source_path", "captions_file"}


def config_hash(cfg: DataConfig) -> str:
    """What every round of one live dataset must share: resolution, splits, annotators, ..."""
    return fingerprint("live-data", cfg.model_dump(exclude=_ROUND_INVARIANT))


def content_hash(rec: RawRecord) -> str:
    """The record as the source holds it: file bytes (or pixels) and caption."""
    h = hashlib.sha256()
    if isinstance(rec.image, np.ndarray):
        h.update(repr((rec.image.shape, rec.image.dtype.str)).encode())
        h.update(np.ascontiguousarray(rec.image).tobytes())
    else:
        h.update(bytes(rec.image))
    cap = rec.caption.decode("utf-8", "replace") if isinstance(rec.caption, bytes) else rec.caption
    h.update(b"\0" + (cap or "").encode("utf-8", "surrogatepass"))  # a lone surrogate: rejected by record_row
    return h.hexdigest()


def _round_of(path: Path) -> int:
    m = _ROUND_FILE.search(path.name)
    return int(m.group(1)) if m else -1


def last_round(con, dataset: str) -> tuple[int, str | None]:
    row = con.execute("SELECT round, config_hash FROM data_rounds WHERE dataset = ? ORDER BY round DESC LIMIT 1",
                      [dataset]).fetchone()
    return (row[0], row[1]) if row else (0, None)


def _scan(source, items: list, duplicate: list, known: dict, cfg: DataConfig, rnd: int):
    """The round's new and changed items' rows and hashes, its rejects (one bad record never kills the
    round) and the count of each kind (added, changed, unchanged)."""
    rows, hashes, rejects, kinds = [], {}, [], {"added": 0, "changed": 0, "unchanged": 0}
    for item, dup in tqdm(list(zip(items, duplicate)), desc=f"round {rnd}: hash {source.name}", unit="item", mininterval=2):
        try:
            duplicate_check(item, dup)
            rec = source.load(item)
            h = content_hash(rec)
            prev = known.get(item.image_id)
            if prev is not None and prev == (h, "active"):
                kinds["unchanged"] += 1
                continue
            rows.append(record_row(item, rec, cfg, source.name))
            hashes[item.image_id] = h
            kinds["changed" if prev is not None and prev[1] != "deleted" else "added"] += 1
        except Exception as e:  # noqa: BLE001 - one bad record never kills the round
            rejects.append(reject_row(item, e))
    return rows, hashes, rejects, kinds


def _write_and_annotate(root: Path, rows: list, cfg: DataConfig, rnd: int) -> set[str]:
    """The round's image shards written and annotated (each file atomic); the ids the annotators rejected."""
    ann_rejected: set[str] = set()
    weights = Path(cfg.annotator_weights) if cfg.annotator_weights else None
    for s in range(0, len(rows), cfg.shard_size):
        name = f"r{rnd:04d}-{s // cfg.shard_size:05d}.parquet"
        write_shard(root / f"images-{name}", rows[s:s + cfg.shard_size], IMAGES_SCHEMA)
        annotate_shard(root / f"images-{name}", root / f"annotations-{name}", cfg.annotators, weights)
        rej = pq.read_table(root / f"rejects-{name}", columns=["image_id"]).column("image_id").to_pylist()
        ann_rejected |= set(rej)
    return ann_rejected


def update_live(cfg: DataConfig, root: Path, db: Path, dataset: str) -> dict:
    """One round: write and annotate the new or changed items, mark deleted ones; returns its summary."""
    t0 = time.perf_counter()
    with connect(db) as con:
        ensure_schema(con)
        prev_round, prev_hash = last_round(con, dataset)
        known = {r[0]: (r[1], r[2]) for r in con.execute(
            "SELECT image_id, content_hash, status FROM source_items WHERE dataset = ?", [dataset]).fetchall()}
    chash = config_hash(cfg)
    if prev_hash is not None and prev_hash != chash:
        raise ValueError(f"live dataset {dataset!r} was built with another data configuration (hash {prev_hash}, now "
                         f"{chash}): only n_groups, layouts_per_group, images_per_layout, shard_size, the workers and cluster and source paths may change "
                         f"between rounds. Use a new dataset name for the new configuration.")
    rnd = prev_round + 1
    prepare(root)
    for stale in root.glob("*-r*-*.parquet"):  # written by a round that crashed before committing
        if _round_of(stale) >= rnd:
            stale.unlink()

    source = make_source(cfg)
    items, duplicate = listing(source)
    rows, hashes, rejects, kinds = _scan(source, items, duplicate, known, cfg, rnd)
    listed_ids = {it.image_id for it in items}
    deleted = sorted(i for i, (_, st) in known.items() if st != "deleted" and i not in listed_ids)

    # Files first (each atomic), then the round's rows in one transaction.
    write_shard(root / f"ingest-rejects-r{rnd:04d}-00000.parquet", rejects, REJECTS_SCHEMA)
    ann_rejected = _write_and_annotate(root, rows, cfg, rnd)

    now = datetime.now(timezone.utc)
    item_rows = [(dataset, i, h, rnd, "rejected" if i in ann_rejected else "active", now, now) for i, h in hashes.items()]
    item_rows += [(dataset, r["image_id"], "", rnd, "rejected", now, now) for r in rejects if r["image_id"] in known]
    item_rows += [(dataset, i, known[i][0], rnd, "deleted", now, now) for i in deleted]
    summary = {"dataset": dataset, "round": rnd, "listed": len(items), **kinds, "deleted": len(deleted),
               "rejected": len(rejects) + len(ann_rejected), "annotated": len(rows),
               "seconds": round(time.perf_counter() - t0, 2)}
    with connect(db) as con:
        ensure_schema(con)
        con.execute("BEGIN")
        # first_seen survives updates: keep the earliest one of an item already known.
        if item_rows:
            con.executemany("""INSERT INTO source_items VALUES (?, ?, ?, ?, ?, ?, ?)
                               ON CONFLICT (dataset, image_id) DO UPDATE SET content_hash = excluded.content_hash,
                               round = excluded.round, status = excluded.status, updated_at = excluded.updated_at""",
                            item_rows)
        round_row = DataRoundRow(dataset, rnd, now, chash, len(items), kinds["added"], kinds["changed"], kinds["unchanged"],
                                 len(deleted), summary["rejected"], len(rows), summary["seconds"])
        con.execute(round_row.insert_sql(), round_row.values())
        con.execute("COMMIT")
    return summary


def active_tables(root: Path, db: Path, dataset: str) -> tuple[pa.Table, pa.Table]:
    """The images and annotations of the latest version of every active item."""
    with connect(db, read_only=True) as con:
        active = dict(con.execute("SELECT image_id, round FROM source_items WHERE dataset = ? AND status = 'active'",
                                  [dataset]).fetchall())

    def read(prefix: str, schema: pa.Schema) -> pa.Table:
        parts = []
        for f in sorted(root.glob(f"{prefix}-r*-*.parquet")):
            t, rnd = with_image_structs(pq.read_table(f)), _round_of(f)  # rounds of older code: raw bytes
            keep = [active.get(i) == rnd for i in t.column("image_id").to_pylist()]
            parts.append(t.filter(pa.array(keep, pa.bool_())))
        return pa.concat_tables(parts) if parts else schema.empty_table()

    return read("images", IMAGES_SCHEMA), read("annotations", ANNOTATIONS_SCHEMA)


def load_live_split(root: Path, db: Path, dataset: str, split: str, pairing: Pairing = "other-layout") -> SplitData:
    images, ann = active_tables(root, db, dataset)
    return split_from_tables(images, ann, split, where=f"live dataset {dataset!r} ({root})", pairing=pairing)


def snapshot_split(root: Path, db: Path, dataset: str, split: str, out: Path) -> None:
    """Copy one split of the live dataset as it is now into `out` (images and annotations shards):
    the frozen benchmark that every later round is scored on, or the training data that a
    multi-process candidate's workers read without opening the database."""
    import pyarrow.compute as pc

    images, ann = active_tables(root, db, dataset)
    images = images.filter(pc.equal(images["split"], split))
    ids = pa.array(images.column("image_id").to_pylist(), pa.string())
    write_shard(out / "annotations-00000.parquet", ann.filter(pc.is_in(ann["image_id"], value_set=ids)).to_pylist(),
                ANNOTATIONS_SCHEMA)
    write_shard(out / "images-00000.parquet", images.to_pylist(), IMAGES_SCHEMA)
