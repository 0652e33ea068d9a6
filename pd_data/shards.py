"""Parquet shards: the documented schemas, atomic writes, and reading a stage's shards back."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pd_data.state import atomic_write_bytes

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),      # unique across the dataset (procedural: "<group_id>-<layout>-<k>")
    ("group_id", pa.string()),      # one caption theme (an InstructPix2Pix prompt folder)
    ("layout_id", pa.string()),     # one picture and its edited twins (an InstructPix2Pix seed)
    ("split", pa.string()),         # train | val | test, by group
    ("caption", pa.string()),
    ("image", pa.binary()),         # PNG bytes, RGB, resolution x resolution
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("source", pa.string()),        # which source produced it (procedural, folder, ...)
    ("provenance", pa.string()),    # JSON: the scene for procedural, the path for files
])
ANNOTATIONS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("modality", pa.string()),      # depth | hed | seg | canny | ...
    ("map", pa.binary()),           # PNG bytes, RGB, same size as the image
    ("annotator", pa.string()),     # e.g. procedural, controlnet_aux.HEDdetector
    ("annotator_version", pa.string()),
    ("weights_hash", pa.string()),  # sha256 of the weights file, "" for weight-free annotators
])
REJECTS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("ref", pa.string()),           # where the source holds it (path, row, ...)
    ("stage", pa.string()),         # ingest | annotate
    ("reason", pa.string()),        # empty-file, not-an-image, truncated, decompression-bomb, too-small, ...
    ("detail", pa.string()),
])
PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("task", pa.string()),
    ("example_id", pa.string()),    # image whose (source, target) forms the example pair
    ("query_id", pa.string()),      # image whose source is the query and whose target is the answer
    ("text", pa.string()),
    ("seed", pa.int64()),           # generator seed of this prompt, the same for every model
])


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# Rows per row group: a random read of one image (training, see `pd_data.dataset.ShardColumn`) decodes
# its row group only, ~16 PNGs, not the whole shard.
ROW_GROUP_ROWS = 16


def write_shard(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    """Write rows as one Parquet file, atomically: a crash leaves the old file or none, never half."""
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    atomic_write_bytes(path, sink.getvalue())


def shard_files(folder: Path, prefix: str) -> list[Path]:
    files = sorted(folder.glob(f"{prefix}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {prefix}-*.parquet shards in {folder}; run the stage that writes them first")
    return files


def read_shards(folder: Path, prefix: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in shard_files(folder, prefix)])


LINEAGE_SCHEMA = pa.schema([("annotation_set", pa.string()), ("dataset", pa.string()), ("annotators", pa.string())])


def write_lineage(folder: Path, annotation_set: str, dataset: str, annotators: dict[str, str]) -> None:
    """Which dataset (ingest key) an annotation set was made from: the `annotations` view joins on it."""
    import json

    write_shard(folder / "lineage.parquet", [{"annotation_set": annotation_set, "dataset": dataset,
                                              "annotators": json.dumps(annotators)}], LINEAGE_SCHEMA)
