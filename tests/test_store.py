import multiprocessing as mp
import re
import shutil
from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pytest

from pd_data.shards import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA, PROMPTS_SCHEMA, REJECTS_SCHEMA, write_shard
from pd_core.state import StateDir
from pd_eval.schema import MetricRow, RunRow
from pd_eval.store import connect, format_table, init_db, query, register_data_views, replace_evaluation, write_run

TABLE1_COLUMNS = ["run_id", "profile", "model", "feature_extractor", "fid_depth->image", "fid_hed->image",
                  "fid_seg->image", "rmse_image->depth", "rmse_image->hed", "rmse_image->seg"]


def _metric(eval_id, model, task, metric, value):
    return MetricRow(eval_id, model, task, metric, value, value, value, 4, "random-conv-v1" if metric == "fid" else "",
                     "fast", datetime.now(timezone.utc))


def _run(run_id="r1", eval_id="e1"):
    now = datetime.now(timezone.utc)
    return RunRow(run_id, "smoke", eval_id, now, now, "completed", "x", "{}")


def test_paper_table_has_the_documented_columns_and_the_paper_rows(tmp_path):
    db = tmp_path / "r.duckdb"
    init_db(db)
    write_run(db, _run())
    replace_evaluation(db, "e1", [_metric("e1", "prompt-diffusion", "image->depth", "rmse", 0.25),
                                  _metric("e1", "prompt-diffusion", "depth->image", "fid", 12.0)])
    names, rows = query(db, "SELECT * FROM paper_table ORDER BY model")
    assert names == TABLE1_COLUMNS
    by_model = {r[2]: r for r in rows}
    assert by_model["Prompt Diffusion [paper]"][4] == 18.60 and by_model["CN(FT) [paper]"][9] == 0.36
    assert by_model["prompt-diffusion"][7] == 0.25 and by_model["prompt-diffusion"][4] == 12.0
    assert by_model["prompt-diffusion"][3] == "random-conv-v1"
    assert "prompt-diffusion" in format_table(names, rows)


def test_a_metric_is_written_once_per_key_and_an_unfinished_attempt_is_replaced_whole(tmp_path):
    db = tmp_path / "r.duckdb"
    replace_evaluation(db, "e1", [_metric("e1", "m", "image->hed", "rmse", 0.5), _metric("e1", "m", "image->seg", "rmse", 0.5)])
    with pytest.raises(duckdb.ConstraintException):  # one key twice in one evaluation: an error, not a replacement
        replace_evaluation(db, "e1", [_metric("e1", "m", "image->hed", "rmse", 0.4), _metric("e1", "m", "image->hed", "rmse", 0.3)])
    assert query(db, "SELECT task, value FROM metrics ORDER BY task")[1] == [("image->hed", 0.5), ("image->seg", 0.5)]
    replace_evaluation(db, "e1", [_metric("e1", "m", "image->hed", "rmse", 0.4)])  # a rerun of the evaluation
    assert query(db, "SELECT task, value FROM metrics")[1] == [("image->hed", 0.4)]
    with pytest.raises(ValueError, match="not evaluation rows of e1"):
        replace_evaluation(db, "e1", [_metric("e2", "m", "image->hed", "rmse", 0.4)])


def test_read_only_query_on_missing_db_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run a benchmark first"):
        query(tmp_path / "none.duckdb", "SELECT 1")


def _writer(db, who, n):
    for i in range(n):
        replace_evaluation(db, f"e-{who}-{i}", [_metric(f"e-{who}-{i}", "m", "image->hed", "rmse", float(i))])


def test_two_writer_processes_both_land_every_row(tmp_path):
    db = tmp_path / "r.duckdb"
    init_db(db)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, w, 40)) for w in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert query(db, "SELECT eval_id[:3], count(*) FROM metrics GROUP BY ALL ORDER BY 1")[1] == [("e-a", 40), ("e-b", 40)]


def test_generalization_view_has_one_row_per_run_unseen_task_condition_and_metric(tmp_path):
    db = tmp_path / "r.duckdb"
    write_run(db, _run())
    replace_evaluation(db, "e1", [_metric("e1", "prompt-diffusion", "canny->image", "fid", 9.0),
                                  _metric("e1", "cn-ft/nearest", "canny->image", "fid", 11.0),
                                  _metric("e1", "prompt-diffusion", "hed->image", "fid", 5.0)])  # trained: not in the view
    names, rows = query(db, "SELECT * FROM generalization ORDER BY condition")
    assert names == ["run_id", "profile", "task", "condition", "metric", "value", "ci_low", "ci_high", "n",
                     "feature_extractor"]
    assert [(r[3], r[5]) for r in rows] == [("cn-ft/nearest", 11.0), ("prompt-diffusion", 9.0)]


LINEAGE_SCHEMA = pa.schema([("annotation_set", pa.string()), ("dataset", pa.string()), ("annotators", pa.string())])
DATA_QUERIES = {  # what each data view answers, in one row
    "images": "SELECT dataset, caption FROM images",
    "annotations": "SELECT dataset, annotation_set, image_id, modality FROM annotations",
    "rejects": "SELECT stage_key, reason FROM rejects ORDER BY stage",
    "prompts": "SELECT prompt_set, text FROM prompts",
    "splits": "SELECT dataset, split, images FROM splits",
}


def _write_data(state: StateDir, caption: str) -> None:
    """One image, its depth map, a reject per stage and a prompt, in the stages' folder layout."""
    ingest, annotate, prompts = (state.stage_dir(s, f"{s}-key") for s in ("ingest", "annotate", "prompts"))
    write_shard(ingest / "images-00000.parquet", [{
        "image_id": "g-0-0", "group_id": "g", "layout_id": "g-0", "split": "test", "caption": caption,
        "image": b"", "width": 8, "height": 8, "source": "procedural", "provenance": "{}"}], IMAGES_SCHEMA)
    write_shard(annotate / "annotations-00000.parquet", [{
        "image_id": "g-0-0", "modality": "depth", "map": b"", "annotator": "procedural",
        "annotator_version": "1", "weights_hash": ""}], ANNOTATIONS_SCHEMA)
    write_shard(annotate / "lineage.parquet", [{"annotation_set": "annotate-key", "dataset": "ingest-key",
                                                "annotators": "{}"}], LINEAGE_SCHEMA)
    for stage, folder in (("annotate", annotate), ("ingest", ingest)):
        write_shard(folder / "rejects-00000.parquet", [{"image_id": "x", "ref": "r", "stage": stage,
                                                        "reason": f"{caption}-reason", "detail": ""}], REJECTS_SCHEMA)
    write_shard(prompts / "prompts.parquet", [{"prompt_id": "p0", "task": "depth->image", "example_id": "g-0-0",
                                               "query_id": "g-0-0", "text": caption, "seed": 0}], PROMPTS_SCHEMA)


def _answers(caption):
    return {"images": [("ingest-key", caption)], "annotations": [("ingest-key", "annotate-key", "g-0-0", "depth")],
            "rejects": [("annotate-key", f"{caption}-reason"), ("ingest-key", f"{caption}-reason")],
            "prompts": [("prompts-key", caption)], "splits": [("ingest-key", "test", 1)]}


def test_a_copied_state_directory_reads_its_own_shards(tmp_path, monkeypatch):
    original = StateDir(tmp_path / "state1")
    _write_data(original, "original")
    register_data_views(original.db, original.data)
    copy = StateDir(tmp_path / "state2")
    shutil.copytree(original.root, copy.root)
    _write_data(copy, "copied")  # the copy's shards now differ from the original's
    monkeypatch.chdir(original.root)  # a working directory with data/ingest/... must not be read either

    assert {v: query(copy.db, q)[1] for v, q in DATA_QUERIES.items()} == _answers("copied")
    assert {v: query(original.db, q)[1] for v, q in DATA_QUERIES.items()} == _answers("original")

    shutil.rmtree(original.root)  # `mv state1 state2`, in effect
    monkeypatch.chdir(tmp_path)  # the working directory went with it
    assert {v: query(copy.db, q)[1] for v, q in DATA_QUERIES.items()} == _answers("copied")
    with connect(copy.db) as con:  # a read-write connection (the flows') resolves them too
        assert con.execute(DATA_QUERIES["images"]).fetchall() == [("ingest-key", "copied")]


def test_data_views_on_a_state_without_shards_fail_with_what_to_do(tmp_path):
    state = StateDir(tmp_path / "fresh")
    init_db(state.db)  # a fresh state: results tables, no data views yet
    assert query(state.db, "SELECT count(*) FROM runs")[1] == [(0,)]
    with pytest.raises(duckdb.CatalogException, match="made when the pipeline's data stage finishes"):
        query(state.db, "SELECT * FROM images")

    _write_data(state, "c")
    register_data_views(state.db, state.data)
    shutil.rmtree(state.data)  # a state directory copied without its data/ folder
    assert query(state.db, "SELECT count(*) FROM runs")[1] == [(0,)]
    with pytest.raises(duckdb.IOException, match=re.escape(f"relative to the state directory {state.root}")):
        query(state.db, "SELECT * FROM splits")


def test_views_read_shards_of_old_raw_bytes_and_new_struct_formats_side_by_side(tmp_path):
    """A state directory keeps older keys' shards (image as raw bytes) beside new ones (the HF Image
    struct): `SELECT *` over the views still works, the pixels left out of them."""
    import pyarrow.parquet as pq

    state = StateDir(tmp_path / "state")
    _write_data(state, "new")
    old = state.stage_dir("ingest", "old-key") / "images-00000.parquet"
    old.parent.mkdir(parents=True)
    new_table = pq.read_table(state.stage_dir("ingest", "ingest-key") / "images-00000.parquet")
    raw = new_table.set_column(new_table.schema.get_field_index("image"), "image", pa.array([b"png"], pa.binary()))
    pq.write_table(raw, old)
    register_data_views(state.db, state.data)
    names, rows = query(state.db, "SELECT * FROM images ORDER BY dataset")
    assert "image" not in names and [r[names.index("dataset")] for r in rows] == ["ingest-key", "old-key"]
    names, _ = query(state.db, "SELECT * FROM annotations")
    assert "map" not in names and "modality" in names
