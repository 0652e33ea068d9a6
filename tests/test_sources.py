"""Every source on fixtures made here, the bad-input list, and kill-and-resume of a real process."""
import hashlib
import io
import json
import multiprocessing as mp
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pd_data.config import DataConfig
from pd_data.ingest import ingest
from pd_data.shards import decode_image, read_shards
from pd_data.sources import FolderSource, InstructPix2PixSource, ParquetSource

NOT_PROC = {"depth": "controlnet_aux", "hed": "controlnet_aux", "seg": "transformers"}


def _cfg(**kw) -> DataConfig:
    return DataConfig(source="folder", source_path="unused", annotators=NOT_PROC, **kw)


def _img(w=40, h=30, color=(200, 30, 30), fmt="PNG", mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else None).save(buf, format=fmt, **save)
    return buf.getvalue()


def _rows(out):
    return {r["image_id"]: r for r in read_shards(out, "images").to_pylist()}


def _rejects(out):
    return {r["image_id"]: r["reason"] for r in read_shards(out, "rejects").to_pylist()}


def test_folder_with_jsonl_csv_and_txt_captions(tmp_path):
    for name, side in (("jsonl", "caps.jsonl"), ("csv", "caps.csv")):
        root = tmp_path / name
        (root / "groupA").mkdir(parents=True)
        (root / "groupA" / "a.png").write_bytes(_img())
        (root / "groupA" / "b.png").write_bytes(_img(color=(0, 0, 200)))
        if name == "jsonl":
            (tmp_path / side).write_text('{"file": "groupA/a.png", "caption": "a red thing", "layout": "L1"}\n'
                                         '{"file": "groupA/b.png", "caption": "a blue thing"}\n')
        else:
            (tmp_path / side).write_text("file,caption,layout\ngroupA/a.png,a red thing,L1\ngroupA/b.png,a blue thing,\n")
        out = tmp_path / f"out-{name}"
        summary = ingest(_cfg(), out, FolderSource(root, tmp_path / side))
        rows = _rows(out)
        assert summary["rows_out"] == 2 and rows["groupA/a.png"]["caption"] == "a red thing"
        assert {r["group_id"] for r in rows.values()} == {"groupA"}
        # The side file's layout, else the image is a layout of its own.
        assert (rows["groupA/a.png"]["layout_id"], rows["groupA/b.png"]["layout_id"]) == ("L1", "groupA/b.png")
        assert decode_image(rows["groupA/b.png"]["image"]).shape == (32, 32, 3)
    root = tmp_path / "txt"
    root.mkdir()
    (root / "x.png").write_bytes(_img())
    (root / "x.txt").write_text("caption beside the image")
    assert _rows_of(ingest(_cfg(), tmp_path / "out-txt", FolderSource(root)), tmp_path / "out-txt")["x.png"]["caption"] == \
        "caption beside the image"


def test_flat_folder_with_captions_csv_and_no_group_column_makes_each_image_its_own_group(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.png").write_bytes(_img())
    (root / "b.jpg").write_bytes(_img(fmt="JPEG"))
    (tmp_path / "captions.csv").write_text("file,caption\na.png,a red thing\nb.jpg,another red thing\n")
    rows = _rows_of(ingest(_cfg(), tmp_path / "out", FolderSource(root, tmp_path / "captions.csv")), tmp_path / "out")
    assert {i: (r["group_id"], r["caption"]) for i, r in rows.items()} == \
        {"a.png": ("a.png", "a red thing"), "b.jpg": ("b.jpg", "another red thing")}


def test_captions_file_faults_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.captions_file .*nope.jsonl does not exist"):
        FolderSource(tmp_path, tmp_path / "nope.jsonl")
    (tmp_path / "caps.csv").write_text("name,caption\na.png,a thing\n")
    with pytest.raises(ValueError, match=r"data.captions_file .*caps.csv has no file column"):
        FolderSource(tmp_path, tmp_path / "caps.csv")


def _rows_of(summary, out):
    assert summary["rows_out"] >= 1
    return _rows(out)


def test_instructpix2pix_layout_takes_both_images_of_every_seed(tmp_path):
    root = tmp_path / "ip2p"
    seeds = []
    for d in ("0001", "0002"):
        (root / d).mkdir(parents=True)
        (root / d / "prompt.json").write_text(json.dumps({"input": f"photo {d}", "output": f"photo {d} at night", "edit": "make it night"}))
        for s in (11, 12):
            (root / d / f"{s}_0.jpg").write_bytes(_img(fmt="JPEG"))
            (root / d / f"{s}_1.jpg").write_bytes(_img(fmt="JPEG", color=(10, 10, 60)))
        seeds.append([d, [11, 12]])
    seeds.append(["0001", [11]])  # listed twice: duplicate ids
    (root / "seeds.json").write_text(json.dumps(seeds))
    out = tmp_path / "out"
    summary = ingest(_cfg(), out, InstructPix2PixSource(root))
    rows = _rows(out)
    assert summary["rows_out"] == 8 and summary["rejects"] == {"duplicate-id": 2}
    assert rows["0001/11_0"]["caption"] == "photo 0001" and rows["0001/11_1"]["caption"] == "photo 0001 at night"
    assert {r["group_id"] for r in rows.values()} == {"0001", "0002"}
    assert rows["0001/11_0"]["layout_id"] == rows["0001/11_1"]["layout_id"] == "0001/11"  # a seed is a layout
    assert len({r["layout_id"] for r in rows.values()}) == 4
    assert json.loads(rows["0002/12_1"]["provenance"])["edit"] == "make it night"


def test_parquet_hf_preset_and_column_mapping(tmp_path):
    hf = pa.table({
        "original_image": [{"bytes": _img(), "path": "a.png"}, {"bytes": _img(), "path": "b.png"}],
        "edited_image": [{"bytes": _img(color=(0, 200, 0)), "path": "a2.png"}, {"bytes": b"", "path": "x"}],
        "original_prompt": ["a cat", "a dog"], "edited_prompt": ["a green cat", "a dog in snow"]})
    pq.write_table(hf, tmp_path / "train-0000.parquet")
    out = tmp_path / "out"
    summary = ingest(_cfg(), out, ParquetSource(tmp_path / "train-0000.parquet", preset="instructpix2pix-hf"))
    rows = _rows(out)
    assert summary["rows_out"] == 3 and summary["rejects"] == {"empty-file": 1}
    assert rows["train-0000/0/1"]["caption"] == "a green cat" and rows["train-0000/0/1"]["group_id"] == "train-0000/0"
    assert rows["train-0000/0/0"]["layout_id"] == rows["train-0000/0/1"]["layout_id"] == "train-0000/0"  # the row
    plain = pa.table({"img": [_img()], "text": ["plain mapping"]})
    pq.write_table(plain, tmp_path / "plain.parquet")
    src = ParquetSource(tmp_path / "plain.parquet", columns=[{"image": "img", "caption": "text"}])
    assert _rows_of(ingest(_cfg(), tmp_path / "o2", src), tmp_path / "o2")["plain/0/0"]["caption"] == "plain mapping"


def _exif_rotated() -> bytes:
    """A 40x20 landscape JPEG, left half red, whose EXIF says 'rotate 90 degrees clockwise to display'."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_bad_input_is_normalised_or_rejected_and_the_run_continues(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    good = _img(64, 64)
    files = {
        "ok.png": good, "zero.png": b"", "text.png": b"hello, I am not an image",
        "truncated.jpg": _img(64, 64, fmt="JPEG")[:300], "gray.png": _img(mode="L", color=None),
        "rgba.png": _img(mode="RGBA", color=None), "cmyk.jpg": _img(mode="CMYK", fmt="JPEG", color=None),
        "palette.png": _img(mode="P", color=None), "tiny.png": _img(8, 8), "rotated.jpg": _exif_rotated(),
        "nocaption.png": good, "latin1.png": good,
    }
    deep = np.full((30, 30), 60000, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    files["sixteen.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 Mpx, a few KB on disk
    files["bomb.png"] = buf.getvalue()
    for name, data in files.items():
        (root / name).write_bytes(data)
        if name != "nocaption.png":
            (root / name).with_suffix(".txt").write_bytes(b"caf\xe9 au lait" if name == "latin1.png" else b"a caption")
    out = tmp_path / "out"
    summary = ingest(_cfg(), out, FolderSource(root))
    rejects = _rejects(out)
    assert rejects == {"zero.png": "empty-file", "text.png": "not-an-image", "truncated.jpg": "truncated",
                       "tiny.png": "too-small", "bomb.png": "decompression-bomb", "nocaption.png": "missing-caption"}
    assert summary["rows_out"] == len(files) - len(rejects) and sum(summary["rejects"].values()) == len(rejects)
    rows = _rows(out)
    for r in rows.values():
        assert decode_image(r["image"]).shape == (32, 32, 3)
    assert decode_image(rows["sixteen.png"]["image"]).mean() > 200  # 60000/65535 of white, not clipped to 255 noise
    assert decode_image(rows["rgba.png"]["image"]).min() == 255     # transparent -> composited on white
    rot = decode_image(rows["rotated.jpg"]["image"])
    assert rot[:8, :, 0].mean() > 200 and rot[-8:, :, 0].mean() < 60  # red half now on top
    assert "\ufffd" in rows["latin1.png"]["caption"] and json.loads(rows["latin1.png"]["provenance"])["caption_repaired"]


def test_unreadable_parquet_file_is_a_reject(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"image": [_img()], "caption": ["fine"]}), tmp_path / "good.parquet")
    summary = ingest(_cfg(), tmp_path / "out", ParquetSource(tmp_path))
    assert summary["rows_out"] == 1 and summary["rejects"] == {"load-error": 1}


def _digest(out):
    t = read_shards(out, "images")
    return t.num_rows, hashlib.sha256(str(t.to_pylist()).encode()).hexdigest()


def _slow_ingest(out):
    ingest(DataConfig(n_groups=30, shard_size=8, resolution=64), out)


def test_killed_ingest_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path):
    cfg = DataConfig(n_groups=30, shard_size=8, resolution=64)
    ingest(cfg, tmp_path / "whole")
    proc = mp.get_context("spawn").Process(target=_slow_ingest, args=(tmp_path / "killed",))
    proc.start()
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "killed").glob("images-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # mid-run: some shards complete, one possibly half-written as a temporary file
    proc.join()
    done = len(list((tmp_path / "killed").glob("images-*.parquet")))
    assert 2 <= done < 15, "the kill should land mid-run"
    summary = ingest(cfg, tmp_path / "killed")
    assert summary["shards_resumed"] == done
    assert _digest(tmp_path / "killed") == _digest(tmp_path / "whole")
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # a killed write's temporary file is swept


def test_folder_source_annotated_by_a_real_backend_and_a_failing_map_is_a_reject(tmp_path, monkeypatch):
    from pd_data import annotate
    from pd_data.annotate import ANNOTATORS, annotate_shard
    from pd_data.dataset import load_split

    class Flaky:
        name, version, weights_hash = "test.flaky", "0", ""

        def __call__(self, image, provenance):
            if image.mean() < 100:  # fails on the dark image only
                raise RuntimeError("cannot annotate this one")
            return image[..., ::-1].copy()

    monkeypatch.setitem(ANNOTATORS, "test", {"flaky": lambda weights_dir: Flaky()})
    annotate.get_annotator.cache_clear()
    root = tmp_path / "photos" / "g1"
    root.mkdir(parents=True)
    (root / "bright.png").write_bytes(_img(64, 64, color=(250, 250, 250)))
    (root / "dark.png").write_bytes(_img(64, 64, color=(5, 5, 5)))
    (root / "mid.png").write_bytes(_img(64, 64, color=(200, 120, 200)))
    for p in root.glob("*.png"):
        p.with_suffix(".txt").write_text(f"a {p.stem} square")
    cfg = DataConfig(source="folder", source_path=str(tmp_path / "photos"), split_fractions=(1.0, 0.0, 0.0),
                     annotators={"canny": "controlnet_aux", "flaky": "test"})
    out = tmp_path / "out"
    ingest(cfg, out / "img")
    shard = next((out / "img").glob("images-*.parquet"))
    result = annotate_shard(shard, out / "ann" / "annotations-00000.parquet", cfg.annotators)
    assert result["rows"] == 3 + 2 and result["rejects"] == 1
    rej = read_shards(out / "ann", "rejects").to_pylist()
    assert [(r["image_id"], r["reason"]) for r in rej] == [("g1/dark.png", "annotator-error:flaky")]
    ann = read_shards(out / "ann", "annotations").to_pylist()
    assert {(r["modality"], r["annotator"]) for r in ann} == {("canny", "controlnet_aux.CannyDetector"), ("flaky", "test.flaky")}
    data = load_split(out / "img", out / "ann", "train")
    assert sorted(data.arrays) == ["g1/bright.png", "g1/mid.png"]  # the image with a missing map is left out
    annotate.get_annotator.cache_clear()
