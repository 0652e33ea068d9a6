"""Parquet shards: the documented schemas, atomic writes, and reading a stage's shards back.

Images and maps are stored as Hugging Face's Image struct `{bytes, path}` and every schema carries
the `huggingface` features metadata that `datasets` writes, so `datasets.load_dataset("parquet", ...)`
and the Hub's viewer decode the columns as images.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pd_core.state import atomic_write_bytes

# Hugging Face's `datasets.Image()` feature in Arrow: the PNG's bytes and a file name (null: ours are
# encoded in memory, the row's image_id names them).
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_schema(fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    """A schema with the `huggingface` metadata of `datasets.Features`: {"_type": "Image"} for an
    `IMAGE` column, {"dtype": ..., "_type": "Value"} for a plain one."""
    def feature(t: pa.DataType) -> dict:
        if t == IMAGE:
            return {"_type": "Image"}
        if pa.types.is_nested(t):
            raise TypeError(f"no Hugging Face Value for the nested type {t}; use IMAGE or a plain column")
        return {"dtype": str(t), "_type": "Value"}  # Arrow's names are datasets' (string, int32, int64, ...)

    features = {name: feature(t) for name, t in fields}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


IMAGES_SCHEMA = hf_schema([
    ("image_id", pa.string()),      # unique across the dataset (procedural: "<group_id>-<layout>-<k>")
    ("group_id", pa.string()),      # one caption theme (an InstructPix2Pix prompt folder)
    ("layout_id", pa.string()),     # one picture and its edited twins (an InstructPix2Pix seed)
    ("split", pa.string()),         # train | val | test, by group
    ("caption", pa.string()),
    ("image", IMAGE),               # PNG, RGB, resolution x resolution
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("source", pa.string()),        # which source produced it (procedural, folder, ...)
    ("provenance", pa.string()),    # JSON: the scene for procedural, the path for files
])
ANNOTATIONS_SCHEMA = hf_schema([
    ("image_id", pa.string()),
    ("modality", pa.string()),      # depth | hed | seg | canny | ...
    ("map", IMAGE),                 # PNG, RGB, same size as the image
    ("annotator", pa.string()),     # e.g. procedural, controlnet_aux.HEDdetector
    ("annotator_version", pa.string()),
    ("weights_hash", pa.string()),  # sha256 of the weights file, "" for weight-free annotators
])
REJECTS_SCHEMA = hf_schema([
    ("image_id", pa.string()),
    ("ref", pa.string()),           # where the source holds it (path, row, ...)
    ("stage", pa.string()),         # ingest | annotate
    ("reason", pa.string()),        # empty-file, not-an-image, truncated, decompression-bomb, too-small, ...
    ("detail", pa.string()),
])
PROMPTS_SCHEMA = hf_schema([
    ("prompt_id", pa.string()),
    ("task", pa.string()),
    ("example_id", pa.string()),    # image whose (source, target) forms the example pair
    ("query_id", pa.string()),      # image whose source is the query and whose target is the answer
    ("text", pa.string()),
    ("seed", pa.int64()),           # generator seed of this prompt, the same for every model
])
_IMAGE_COLUMNS = {f.name for s in (IMAGES_SCHEMA, ANNOTATIONS_SCHEMA) for f in s if f.type == IMAGE}


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def image_cell(value: dict | bytes | None) -> dict | None:
    """An `IMAGE` column's value: an Image struct as it is, PNG bytes wrapped in one."""
    return value if value is None or isinstance(value, dict) else {"bytes": value, "path": None}


def image_bytes(cell: dict | bytes | None) -> bytes | None:
    """The encoded image of an image cell: the Image struct's bytes, or raw bytes (shards written
    before the struct, users' Parquet files)."""
    return cell.get("bytes") if isinstance(cell, dict) else cell


def decode_image(cell: dict | bytes) -> np.ndarray:
    """An image cell of a shard as an (H, W, 3) uint8 array: every reader of the shards comes here."""
    return np.asarray(Image.open(io.BytesIO(image_bytes(cell))).convert("RGB"))


# Rows per row group: a random read of one image (training, see `pd_data.dataset.ShardColumn`) decodes
# its row group only, ~16 PNGs, not the whole shard.
ROW_GROUP_ROWS = 16


def write_shard(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    """Write rows as one Parquet file, atomically: a crash leaves the old file or none, never half.
    An `IMAGE` column's values may be PNG bytes or Image structs (rows read back from a shard)."""
    images = [f.name for f in schema if f.type == IMAGE]
    if images:
        rows = [{**r, **{c: image_cell(r[c]) for c in images if c in r}} for r in rows]
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    atomic_write_bytes(path, sink.getvalue())


def with_image_structs(table: pa.Table) -> pa.Table:
    """A shard's table with every raw-bytes image column (shards written before the struct) as the
    Image struct, so tables of old and new shards concatenate."""
    for i, f in enumerate(table.schema):
        if f.name in _IMAGE_COLUMNS and pa.types.is_binary(f.type):
            col = table.column(i).combine_chunks()
            struct = pa.StructArray.from_arrays([col, pa.nulls(len(col), pa.string())], fields=list(IMAGE),
                                                mask=col.is_null())
            table = table.set_column(i, pa.field(f.name, IMAGE), struct)
    return table


def shard_files(folder: Path, prefix: str) -> list[Path]:
    files = sorted(folder.glob(f"{prefix}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {prefix}-*.parquet shards in {folder}; run the stage that writes them first")
    return files


def read_shards(folder: Path, prefix: str) -> pa.Table:
    return pa.concat_tables([with_image_structs(pq.read_table(f)) for f in shard_files(folder, prefix)])


LINEAGE_SCHEMA = hf_schema([("annotation_set", pa.string()), ("dataset", pa.string()), ("annotators", pa.string())])


def write_lineage(folder: Path, annotation_set: str, dataset: str, annotators: dict[str, str]) -> None:
    """Which dataset (ingest key) an annotation set was made from: the `annotations` view joins on it."""
    write_shard(folder / "lineage.parquet", [{"annotation_set": annotation_set, "dataset": dataset,
                                              "annotators": json.dumps(annotators)}], LINEAGE_SCHEMA)
