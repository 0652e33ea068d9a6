"""Shards as a Hugging Face dataset: images and maps are `Image` structs with the `huggingface` features
metadata, so `datasets.load_dataset("parquet", ...)` decodes them; users' Parquet files in either image
format (the struct, raw bytes) ingest; shards written before the struct still read."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pd_data import procedural
from pd_data.annotate import annotate_shard
from pd_data.config import DataConfig, PromptConfig
from pd_data.dataset import load_split
from pd_data.ingest import ingest
from pd_data.prompts import materialise_prompts
from pd_data.shards import IMAGE, IMAGES_SCHEMA, decode_image, read_shards
from pd_data.sources import ParquetSource

NO_DATASETS = "the `datasets` package is not installed (pip install -e '.[dev]'), so there is nothing to load the shards with"
CFG = DataConfig(n_groups=2, split_fractions=(1.0, 0.0, 0.0), shard_size=4)  # 2 shards of 4 images, 32 x 32, every map


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One ingested and annotated procedural dataset: images/, annotations/ (and their rejects)."""
    root = tmp_path_factory.mktemp("hf")
    ingest(CFG, root / "images")
    for p in sorted((root / "images").glob("images-*.parquet")):
        annotate_shard(p, root / "annotations" / p.name.replace("images", "annotations"), CFG.annotators)
    return root


def _scene_maps(provenance: str) -> dict[str, np.ndarray]:
    """The original pixels of a procedural image and its maps, re-rendered from the scene."""
    prov = json.loads(provenance)
    return procedural.render(prov["scene"], CFG.resolution, prov["texture_seed"])


def _load(files, cache):
    datasets = pytest.importorskip("datasets", reason=NO_DATASETS)
    return datasets, datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                                           cache_dir=str(cache))


def test_datasets_loads_the_shards_as_pil_images_of_the_original_pixels(world, tmp_path):
    datasets, images = _load(sorted((world / "images").glob("images-*.parquet")), tmp_path / "hf-cache")
    assert images.features["image"] == datasets.Image() and images.num_rows == 8
    originals = {}
    for r in images:
        assert isinstance(r["image"], Image.Image)
        originals[r["image_id"]] = _scene_maps(r["provenance"])
        assert np.array_equal(np.asarray(r["image"].convert("RGB")), originals[r["image_id"]]["image"]), r["image_id"]
    _, maps = _load(sorted((world / "annotations").glob("annotations-*.parquet")), tmp_path / "hf-cache")
    assert maps.features["map"] == datasets.Image() and maps.num_rows == 8 * len(CFG.annotators)
    for r in maps:
        assert np.array_equal(np.asarray(r["map"].convert("RGB")), originals[r["image_id"]][r["modality"]])


def _features(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"huggingface"])["info"]["features"]


def test_every_shard_names_its_features_image_or_value(world, tmp_path):
    materialise_prompts(load_split(world / "images", world / "annotations", "train"), ("depth->image",),
                        PromptConfig(per_task=2), tmp_path / "prompts.parquet")
    shards = {p.name.split("-")[0]: p for p in sorted(world.glob("*/*.parquet"))} | {"prompts": tmp_path / "prompts.parquet"}
    assert set(shards) == {"images", "annotations", "rejects", "prompts"}
    for kind, path in shards.items():
        schema = pq.read_schema(path)
        expected = {f.name: {"_type": "Image"} if f.type == IMAGE else {"dtype": str(f.type), "_type": "Value"}
                    for f in schema}
        assert _features(path) == expected, kind
    assert _features(shards["images"])["image"] == {"_type": "Image"}
    assert _features(shards["annotations"])["map"] == {"_type": "Image"}
    assert _features(shards["images"])["width"] == {"dtype": "int32", "_type": "Value"}


def test_the_metadata_is_what_datasets_itself_writes(world):
    datasets = pytest.importorskip("datasets", reason=NO_DATASETS)
    path = next((world / "images").glob("images-*.parquet"))
    ours = pq.read_schema(path)
    theirs = datasets.Features({f.name: datasets.Image() if f.name == "image" else datasets.Value(str(f.type))
                                for f in IMAGES_SCHEMA}).arrow_schema
    assert ours.equals(theirs, check_metadata=False)
    assert json.loads(ours.metadata[b"huggingface"]) == json.loads(theirs.metadata[b"huggingface"])


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _user_parquet(fmt: str, path, pixels: list[np.ndarray]) -> None:
    """A user's Parquet file of two captioned images: raw PNG bytes, the Image struct as the Hub holds it
    (with its features metadata), or one that `datasets` writes itself."""
    pngs, captions = [_png(p) for p in pixels], [f"picture {k}" for k in range(len(pixels))]
    if fmt == "raw-bytes":
        pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "caption": captions}), path)
    elif fmt == "hf-struct":
        meta = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"},
                                                                 "caption": {"dtype": "string", "_type": "Value"}}}})}
        cells = [{"bytes": b, "path": f"{k}.png"} for k, b in enumerate(pngs)]
        schema = pa.schema([("image", IMAGE), ("caption", pa.string())], metadata=meta)
        pq.write_table(pa.table({"image": cells, "caption": captions}, schema=schema), path)
    else:
        datasets = pytest.importorskip("datasets", reason=NO_DATASETS)
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs], "caption": captions},
                                   features=features).to_parquet(str(path))


@pytest.mark.parametrize("fmt", ["raw-bytes", "hf-struct", "written-by-datasets"])
def test_a_user_parquet_in_either_image_format_ingests_to_its_pixels(tmp_path, fmt):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    _user_parquet(fmt, tmp_path / "user.parquet", pixels)
    cfg = DataConfig(source="parquet", source_path=str(tmp_path / "user.parquet"), annotators={})
    summary = ingest(cfg, tmp_path / "out", ParquetSource(tmp_path / "user.parquet"))
    assert summary["rows_out"] == 2 and summary["rejects"] == {}
    rows = {r["caption"]: r for r in read_shards(tmp_path / "out", "images").to_pylist()}
    for k, p in enumerate(pixels):
        assert np.array_equal(decode_image(rows[f"picture {k}"]["image"]), p), k


def test_a_shard_of_ours_is_a_parquet_source_too(world, tmp_path):
    shard = next((world / "images").glob("images-*.parquet"))
    cfg = DataConfig(source="parquet", source_path=str(shard), annotators={})
    assert ingest(cfg, tmp_path / "again", ParquetSource(shard))["rows_out"] == pq.read_metadata(shard).num_rows
    before = {r["caption"]: decode_image(r["image"]) for r in pq.read_table(shard).to_pylist()}
    after = {r["caption"]: decode_image(r["image"]) for r in read_shards(tmp_path / "again", "images").to_pylist()}
    assert before.keys() == after.keys() and all(np.array_equal(before[c], after[c]) for c in before)


def _as_raw_bytes(src, dst) -> None:
    """A shard as the code before the struct wrote it: the image column holds the PNG bytes."""
    t = pq.read_table(src)
    i = t.schema.get_field_index("image")
    pq.write_table(t.set_column(i, pa.field("image", pa.binary()), t.column(i).combine_chunks().field("bytes")), dst)


def test_shards_written_before_the_struct_still_read(world, tmp_path):
    """A folder (a live dataset's rounds, say) holding shards of both formats reads as one table, and the
    lazy reader decodes both."""
    files = sorted((world / "images").glob("images-*.parquet"))
    folder = tmp_path / "mixed"
    folder.mkdir()
    _as_raw_bytes(files[0], folder / "images-00000.parquet")
    for k, f in enumerate(files[1:], 1):
        (folder / f"images-{k:05d}.parquet").write_bytes(f.read_bytes())
    assert pq.read_schema(folder / "images-00000.parquet").field("image").type == pa.binary()
    assert len(files) > 1  # one shard of each format
    table = read_shards(folder, "images")
    assert table.schema.field("image").type == IMAGE
    expected = {r["image_id"]: _scene_maps(r["provenance"])["image"] for r in table.to_pylist()}
    assert all(np.array_equal(decode_image(r["image"]), expected[r["image_id"]]) for r in table.to_pylist())
    split = load_split(folder, world / "annotations", "train")
    assert split.arrays and all(np.array_equal(split.arrays[i]["image"], expected[i]) for i in split.arrays)
