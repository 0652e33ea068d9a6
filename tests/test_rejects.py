"""No bad record stops a run, nothing is lost: each is a reject naming its file, line and reason, and the
rest of its shard is written."""
import io
import json
import os
import struct
import zlib

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pd_data.config import DataConfig
from pd_data.ingest import ingest
from pd_data.shards import read_shards
from pd_data.sources import FolderSource, InstructPix2PixSource

NOT_PROC = {"depth": "controlnet_aux", "hed": "controlnet_aux", "seg": "transformers"}


def _cfg(**kw) -> DataConfig:
    return DataConfig(source="folder", source_path="unused", annotators=NOT_PROC, **kw)


def _img(color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format=fmt)
    return buf.getvalue()


def _ingest(tmp_path, source, **cfg) -> tuple[dict, dict]:
    """(images rows, rejects rows), each by image id."""
    out = tmp_path / "out"
    ingest(_cfg(**cfg), out, source)
    assert len(list(out.glob("images-*.parquet"))) == 1  # one shard: the good items share it with the rejects
    return ({r["image_id"]: r for r in read_shards(out, "images").to_pylist()},
            {r["image_id"]: r for r in read_shards(out, "rejects").to_pylist()})


def _photos(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.png").write_bytes(_img())
    (root / "b.png").write_bytes(_img((0, 0, 200)))
    return root


A, B = '{"file": "a.png", "caption": "first"}', '{"file": "b.png", "caption": "blue"}'
# name: (captions file, its lines, the reject's id, reason, what its detail names)
SIDE_FILE_CASES = {
    "line-not-json": ("caps.jsonl", [A, '{"file": "b.png", "caption": oops}', B], "caps.jsonl:2", "bad-caption-line",
                      ["caps.jsonl:2", "not valid JSON"]),
    "line-not-an-object": ("caps.jsonl", [A, '["b.png", "x"]', B], "caps.jsonl:2", "bad-caption-line",
                           ["caps.jsonl:2", "not an object"]),
    "jsonl-row-names-no-file": ("caps.jsonl", [A, '{"caption": "orphan"}', B], "caps.jsonl:2", "bad-caption-line",
                                ["caps.jsonl:2", "names no file"]),
    "csv-row-names-no-file": ("caps.csv", ["file,caption", "a.png,first", ",orphan", "b.png,blue"], "caps.csv:3",
                              "bad-caption-line", ["caps.csv:3", "names no file"]),
    "second-row-for-a-file": ("caps.jsonl", [A, B, '{"file": "a.png", "caption": "second"}'], "caps.jsonl:3",
                              "duplicate-id", ["caps.jsonl:3", "'a.png'", "first (line 1) wins"]),
    "second-csv-row-for-a-file": ("caps.csv", ["file,caption", "a.png,first", "b.png,blue", "a.png,second"],
                                  "caps.csv:4", "duplicate-id", ["caps.csv:4", "first (line 2) wins"]),
    "listed-but-not-on-disk": ("caps.jsonl", [A, '{"file": "gone.png", "caption": "lost"}', B], "gone.png",
                               "missing-file", ["photos/gone.png is not on disk", "caps.jsonl:2"]),
    "lone-surrogate-caption": ("caps.jsonl", [A, '{"file": "b.png", "caption": "caf\\udcff"}'], "b.png",
                               "unencodable-text", ["caption 'caf\\udcff'", "surrogates not allowed"]),
}


@pytest.mark.parametrize("case", SIDE_FILE_CASES)
def test_a_bad_captions_line_is_a_reject_and_the_rest_is_written(tmp_path, case):
    name, lines, reject_id, reason, detail = SIDE_FILE_CASES[case]
    root, side = _photos(tmp_path), tmp_path / name
    side.write_text("\n".join(lines) + "\n")
    source = FolderSource(root, side)
    assert source.items() == FolderSource(root, side).items()  # deterministic: shard s always holds the same items
    rows, rejects = _ingest(tmp_path, source)
    assert {i: r["reason"] for i, r in rejects.items()} == {reject_id: reason}
    assert all(d in rejects[reject_id]["detail"] for d in detail), rejects[reject_id]["detail"]
    assert set(rows) == {"a.png", "b.png"} - {reject_id}
    assert rows["a.png"]["caption"] == "first"  # of two rows for one file, the first wins


def test_a_filename_that_is_not_utf8_is_a_reject_and_its_shard_is_written(tmp_path):
    root = _photos(tmp_path)
    bad = os.fsencode(root) + b"/caf\xff.png"  # Linux allows any bytes: Python names it with a surrogate escape
    with open(bad, "wb") as f:
        f.write(_img())
    with open(bad[:-4] + b".txt", "wb") as f:
        f.write(b"a caption")
    (root / "a.txt").write_text("first")
    (root / "b.txt").write_text("blue")
    rows, rejects = _ingest(tmp_path, FolderSource(root))
    assert {i: r["reason"] for i, r in rejects.items()} == {"caf\\udcff.png": "unencodable-text"}  # escaped, so written
    assert rejects["caf\\udcff.png"]["detail"].startswith("image_id")
    assert set(rows) == {"a.png", "b.png"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_a_caption_that_is_not_utf8_is_repaired_and_marked_whatever_the_format(tmp_path, fmt):
    root, side = _photos(tmp_path), tmp_path / f"caps.{fmt}"
    if fmt == "jsonl":
        side.write_bytes(b'{"file": "a.png", "caption": "caf\xe9 au lait"}\n{"file": "b.png", "caption": "blue"}\n')
    elif fmt == "csv":
        side.write_bytes(b"file,caption\na.png,caf\xe9 au lait\nb.png,blue\n")
    else:
        (root / "a.txt").write_bytes(b"caf\xe9 au lait")
        (root / "b.txt").write_bytes(b"blue")
    rows, rejects = _ingest(tmp_path, FolderSource(root, side if fmt != "txt" else None))
    assert not rejects and rows["a.png"]["caption"] == "caf\ufffd au lait"
    assert json.loads(rows["a.png"]["provenance"])["caption_repaired"] is True
    assert "caption_repaired" not in json.loads(rows["b.png"]["provenance"])


IP2P_CASES = {  # name: (reason, what its detail names)
    "missing-prompt-json": ("missing-prompt-json", "0002/prompt.json not found"),
    "prompt-json-not-json": ("bad-prompt-json", "0002/prompt.json:1: not valid JSON"),
    "image-not-on-disk": ("missing-file", "0002/11_1.jpg (listed in"),
    "prompt-json-not-utf8": (None, ""),  # repaired, not rejected
}


@pytest.mark.parametrize("case", IP2P_CASES)
def test_instructpix2pix_prompt_folder_faults_have_their_own_reason(tmp_path, case):
    reason, detail = IP2P_CASES[case]
    root = tmp_path / "ip2p"
    for d in ("0001", "0002"):
        (root / d).mkdir(parents=True)
        (root / d / "prompt.json").write_text(json.dumps({"input": "a photo", "output": "at night", "edit": "night"}))
        (root / d / "11_0.jpg").write_bytes(_img(fmt="JPEG"))
        (root / d / "11_1.jpg").write_bytes(_img((10, 10, 60), fmt="JPEG"))
    (root / "seeds.json").write_text(json.dumps([["0001", [11]], ["0002", [11]]]))
    bad = root / "0002" / "prompt.json"
    if case == "missing-prompt-json":
        bad.unlink()
    elif case == "prompt-json-not-json":
        bad.write_text('{"input": "a photo",')
    elif case == "image-not-on-disk":
        (root / "0002" / "11_1.jpg").unlink()
    else:
        bad.write_bytes(b'{"input": "caf\xe9", "output": "at night"}')
    rows, rejects = _ingest(tmp_path, InstructPix2PixSource(root))
    failed = {"image-not-on-disk": {"0002/11_1"}, "prompt-json-not-utf8": set()}.get(case, {"0002/11_0", "0002/11_1"})
    assert {i: r["reason"] for i, r in rejects.items()} == {i: reason for i in failed}
    assert all(detail in rejects[i]["detail"] for i in failed)
    assert set(rows) == {"0001/11_0", "0001/11_1", "0002/11_0", "0002/11_1"} - failed
    if case == "prompt-json-not-utf8":
        assert rows["0002/11_0"]["caption"] == "caf\ufffd" and json.loads(rows["0002/11_0"]["provenance"])["caption_repaired"]


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (1-bit grey) and that holds no pixels: a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side,max_pixels,reason", [
    (15000, None, "decompression-bomb"),         # 225 Mpx, the default limit of 50 Mpx
    (15000, 100_000_000, "decompression-bomb"),  # over our limit
    (9600, 100_000_000, "corrupt-image"),        # 92 Mpx, over Pillow's warning (89 Mpx) but not our limit
    (15000, 300_000_000, "corrupt-image"),       # over Pillow's error (179 Mpx) but not our limit
])  # "corrupt-image": the header passed every guard, then the body (there is none) failed to decode
def test_data_max_pixels_is_the_one_size_limit(tmp_path, side, max_pixels, reason):
    root = _photos(tmp_path)
    (root / "huge.png").write_bytes(_png_header(side, side))
    for name in ("a", "b", "huge"):
        (root / f"{name}.txt").write_text("a caption")
    pillow = Image.MAX_IMAGE_PIXELS
    rows, rejects = _ingest(tmp_path, FolderSource(root), **({"max_pixels": max_pixels} if max_pixels else {}))
    assert {i: r["reason"] for i, r in rejects.items()} == {"huge.png": reason}
    assert set(rows) == {"a.png", "b.png"} and Image.MAX_IMAGE_PIXELS == pillow  # Pillow's guard restored


def test_live_rounds_reject_bad_lines_and_keep_the_rest(tmp_path, mirror_annotator):
    from pd_data.incremental import update_live
    root, side, live = _photos(tmp_path), tmp_path / "caps.jsonl", tmp_path / "live"
    side.write_text("\n".join([A, "not json", '{"file": "b.png", "caption": "caf\\udcff"}']) + "\n")
    cfg = DataConfig(source="folder", source_path=str(root), captions_file=str(side), annotators={"mirror": "test"})
    summary = update_live(cfg, live, tmp_path / "db.duckdb", "photos")
    rejects = pq.read_table(live / "ingest-rejects-r0001-00000.parquet").to_pylist()
    assert {r["image_id"]: r["reason"] for r in rejects} == {"caps.jsonl:2": "bad-caption-line", "b.png": "unencodable-text"}
    assert (summary["added"], summary["annotated"]) == (1, 1)
