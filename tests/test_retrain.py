"""Scheduled retraining: incremental ingestion by content hash, the registry, the promotion rule, rollback."""
import io
import json
import math

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY
from flows.cli import main as pd_main
from flows.profiles import merge_settings, load_profile
from flows.retrain import retrain_flow
from pd_data.config import DataConfig
from pd_data.incremental import load_live_split, update_live
from pd_core.state import StateDir
from pd_eval.registry import Score, current, decide
from pd_eval.store import query


def _annotated_rows(live, rnd: int) -> int:
    return sum(pq.read_metadata(p).num_rows for p in live.glob(f"annotations-r{rnd:04d}-*.parquet"))


def test_retraining_rounds_registry_rejection_rollback_and_deletion(prefect_engine, state_dir, capsys):
    db = StateDir.resolve().db
    n_maps = len(load_profile("smoke", TINY).data.annotators)

    # Round 1: everything is new; the first candidate is promoted.
    r1 = retrain_flow("smoke", TINY, dataset="t")
    live = state_dir / "data" / "live" / "t"
    assert (r1["decision"], r1["current"]) == ("promoted", "r0001")
    assert (r1["data"]["added"], r1["data"]["annotated"]) == (24, 24) and _annotated_rows(live, 1) == 24 * n_maps

    # Round 2: 2 more groups (8 images) land in the source; only they are annotated.
    more = merge_settings(TINY, {"data": {"n_groups": 8}})
    r2 = retrain_flow("smoke", more, dataset="t")
    assert {k: r2["data"][k] for k in ("added", "changed", "unchanged", "deleted", "annotated")} == \
        {"added": 8, "changed": 0, "unchanged": 24, "deleted": 0, "annotated": 8}
    assert _annotated_rows(live, 2) == 8 * n_maps
    _, reg = query(db, "SELECT model_id, parent_id, decision, rule IS NOT NULL FROM registry WHERE dataset = 't' ORDER BY model_id")
    assert reg[0][:3] == ("r0001", None, "promoted") and reg[1][:2] == ("r0002", "r0001")
    assert reg[1][2] in ("promoted", "rejected") and all(r[3] for r in reg)
    before = current(db, "t")["model_id"]

    # Round 3: a candidate made worse on purpose (from scratch, a learning rate that wrecks it) is rejected.
    worse = merge_settings(more, {"train": {"learning_rate": 0.05}})
    r3 = retrain_flow("smoke", worse, dataset="t", from_scratch=True)
    assert r3["decision"] == "rejected" and "worse beyond the interval" in r3["reason"]
    assert current(db, "t")["model_id"] == before == r3["current"]
    assert "REJECTED" in open(r3["report"]).read()

    # `pd models` lists every candidate with its decision; rollback is one command.
    assert pd_main(["models", "--dataset", "t"]) == 0
    listing = capsys.readouterr().out
    assert all(m in listing for m in ("r0001", "r0002", "r0003")) and "rejected" in listing
    assert pd_main(["rollback", "--dataset", "t", "--to", "r0001"]) == 0
    assert current(db, "t")["model_id"] == "r0001"
    assert pd_main(["rollback", "--dataset", "t", "--to", "nosuch"]) == 2
    _, events = query(db, "SELECT action, model_id FROM registry_events WHERE dataset = 't' ORDER BY seq")
    assert events[-1] == ("rollback", "r0001") and ("reject", "r0003") in events

    # Round 4: a group (4 images) leaves the source; its images are marked deleted and no longer trained on.
    # Its candidate trains on two processes (torchrun), from a snapshot of the live train split.
    fewer = merge_settings(TINY, {"data": {"n_groups": 7}, "train": {"processes": 2}})
    r4 = retrain_flow("smoke", fewer, dataset="t")
    assert (r4["data"]["deleted"], r4["data"]["annotated"]) == (4, 0)
    _, st = query(db, "SELECT status, count(*) FROM source_items WHERE dataset = 't' GROUP BY status ORDER BY status")
    assert st == [("active", 28), ("deleted", 4)]
    train = load_live_split(live, db, "t", "train")
    assert not any(i.startswith("g000007") for i in train.arrays)
    assert r4["model_id"] == "r0004" and r4["current"] in ("r0001", "r0004")
    # The torchrun path: continued from the current model, with the round as the seed offset, on a
    # snapshot of the live train split that is removed once the candidate is complete.
    cand = live / "candidates" / "r0004"
    job = json.loads((cand / "job.json").read_text())
    assert job["init"] == str(live / "candidates" / "r0001" / "controlnet") and job["spec"]["seed_offset"] == 4  # r0001: rolled back to
    assert job["images"] == job["annotations"] == str(cand / "train-split") and not (cand / "train-split").exists()


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_source_changed_deleted_added_and_config_guard(tmp_path, mirror_annotator):
    root, db, live = tmp_path / "photos" / "g1", tmp_path / "db.duckdb", tmp_path / "live"
    root.mkdir(parents=True)
    for name, color in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200))):
        (root / f"{name}.png").write_bytes(_png(color))
        (root / f"{name}.txt").write_text(f"a {name} square")
    cfg = DataConfig(source="folder", source_path=str(tmp_path / "photos"), split_fractions=(1.0, 0.0, 0.0),
                     annotators={"mirror": "test"})
    first = update_live(cfg, live, db, "photos")
    assert (first["added"], first["annotated"]) == (3, 3)

    (root / "a.png").write_bytes(_png((250, 250, 0)))   # changed content
    (root / "b.txt").write_text("a b square, recaptioned")  # changed caption
    (root / "c.png").unlink()                            # deleted
    (root / "d.png").write_bytes(_png((9, 9, 9)))        # added
    (root / "d.txt").write_text("a d square")
    second = update_live(cfg, live, db, "photos")
    assert {k: second[k] for k in ("added", "changed", "deleted", "unchanged", "annotated")} == \
        {"added": 1, "changed": 2, "deleted": 1, "unchanged": 0, "annotated": 3}
    data = load_live_split(live, db, "photos", "train")
    assert sorted(data.arrays) == ["g1/a.png", "g1/b.png", "g1/d.png"]
    assert tuple(data.arrays["g1/a.png"]["image"][0, 0]) == (250, 250, 0)  # the new version, not the old
    assert data.captions["g1/b.png"] == "a b square, recaptioned"

    third = update_live(cfg, live, db, "photos")  # nothing moved: nothing written
    assert (third["unchanged"], third["annotated"], third["round"]) == (3, 0, 3)
    with pytest.raises(ValueError, match="another data configuration"):
        update_live(cfg.model_copy(update={"resolution": 64}), live, db, "photos")


def test_promotion_rule():
    cur = {("image->depth", "rmse"): Score(0.30, 0.28, 0.32), ("depth->image", "fid"): Score(10.0, 9.0, 11.0)}
    assert decide(cur, None) == (True, "first model of this dataset")
    better = {("image->depth", "rmse"): Score(0.29, 0.27, 0.31), ("depth->image", "fid"): Score(9.5, 8.5, 10.5)}
    assert decide(better, cur)[0]
    # Inside the intervals but worse on average: not promoted.
    flat = {("image->depth", "rmse"): Score(0.31, 0.29, 0.33), ("depth->image", "fid"): Score(9.9, 9.0, 11.0)}
    ok, why = decide(flat, cur)
    assert not ok and "not an improvement" in why
    # Much better on one metric but worse beyond the interval on the other: rejected.
    mixed = {("image->depth", "rmse"): Score(0.10, 0.09, 0.11), ("depth->image", "fid"): Score(11.5, 10.0, 13.0)}
    ok, why = decide(mixed, cur)
    assert not ok and "fid depth->image" in why
    # A metric without an interval is compared with its value.
    nan_ci = {("image->depth", "rmse"): Score(0.30, math.nan, math.nan)}
    assert not decide({("image->depth", "rmse"): Score(0.31, 0.3, 0.32)}, nan_ci)[0]
    with pytest.raises(ValueError, match="no common"):
        decide({("x", "kid"): Score(1, 0, 2)}, cur)
