import multiprocessing as mp
from datetime import datetime, timezone

import pytest

from pd_eval.store import format_table, init_db, query, write_rows

TABLE1_COLUMNS = ["run_id", "profile", "model", "feature_extractor", "fid_depth->image", "fid_hed->image",
                  "fid_seg->image", "rmse_image->depth", "rmse_image->hed", "rmse_image->seg"]


def _metric(eval_id, model, task, metric, value):
    return {"eval_id": eval_id, "model_id": model, "task": task, "metric": metric, "value": value, "ci_low": value,
            "ci_high": value, "n": 4, "feature_extractor": "random-conv-v1" if metric == "fid" else "",
            "protocol": "fast", "created_at": datetime.now(timezone.utc)}


def test_paper_table_has_the_documented_columns_and_the_paper_rows(tmp_path):
    db = tmp_path / "r.duckdb"
    init_db(db)
    write_rows(db, "runs", [{"run_id": "r1", "profile": "smoke", "eval_id": "e1", "started_at": datetime.now(timezone.utc),
                             "finished_at": datetime.now(timezone.utc), "status": "completed", "report_path": "x",
                             "config": "{}"}])
    write_rows(db, "metrics", [_metric("e1", "prompt-diffusion", "image->depth", "rmse", 0.25),
                               _metric("e1", "prompt-diffusion", "depth->image", "fid", 12.0)])
    names, rows = query(db, "SELECT * FROM paper_table ORDER BY model")
    assert names == TABLE1_COLUMNS
    by_model = {r[2]: r for r in rows}
    assert by_model["Prompt Diffusion [paper]"][4] == 18.60 and by_model["CN(FT) [paper]"][9] == 0.36
    assert by_model["prompt-diffusion"][7] == 0.25 and by_model["prompt-diffusion"][4] == 12.0
    assert by_model["prompt-diffusion"][3] == "random-conv-v1"
    assert "prompt-diffusion" in format_table(names, rows)


def test_rewriting_a_metric_replaces_it(tmp_path):
    db = tmp_path / "r.duckdb"
    write_rows(db, "metrics", [_metric("e1", "m", "image->hed", "rmse", 0.5)])
    write_rows(db, "metrics", [_metric("e1", "m", "image->hed", "rmse", 0.4)])
    assert query(db, "SELECT value FROM metrics")[1] == [(0.4,)]


def test_read_only_query_on_missing_db_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run a benchmark first"):
        query(tmp_path / "none.duckdb", "SELECT 1")


def _writer(db, who, n):
    for i in range(n):
        write_rows(db, "metrics", [_metric(f"e-{who}", "m", f"task-{i}", "rmse", float(i))])


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
    assert query(db, "SELECT eval_id, count(*) FROM metrics GROUP BY ALL ORDER BY 1")[1] == [("e-a", 40), ("e-b", 40)]


def test_generalization_view_has_one_row_per_run_unseen_task_condition_and_metric(tmp_path):
    db = tmp_path / "r.duckdb"
    write_rows(db, "runs", [{"run_id": "r1", "profile": "smoke", "eval_id": "e1", "started_at": datetime.now(timezone.utc),
                             "finished_at": datetime.now(timezone.utc), "status": "completed", "report_path": "x",
                             "config": "{}"}])
    write_rows(db, "metrics", [_metric("e1", "prompt-diffusion", "canny->image", "fid", 9.0),
                               _metric("e1", "cn-ft/nearest", "canny->image", "fid", 11.0),
                               _metric("e1", "prompt-diffusion", "hed->image", "fid", 5.0)])  # trained: not in the view
    names, rows = query(db, "SELECT * FROM generalization ORDER BY condition")
    assert names == ["run_id", "profile", "task", "condition", "metric", "value", "ci_low", "ci_high", "n",
                     "feature_extractor"]
    assert [(r[3], r[5]) for r in rows] == [("cn-ft/nearest", 11.0), ("prompt-diffusion", 9.0)]
