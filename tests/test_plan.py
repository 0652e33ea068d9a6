"""The frozen plan: keys computed once from the effective configuration and the code each stage runs;
stages computed once per key, even by two runs at once; stale temporaries removed; clear errors."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prefect import flow

from conftest import TINY
from flows import plan as plan_mod
from flows.plan import STAGES, Plan
from flows.profiles import load_profile
from pd_core.state import StateDir, is_done

# What an edit of each module reruns. The smoke profile's base learns maps (base.map_fraction), and every
# base reads the annotated split, so it follows annotate.
AFTER_ANNOTATE = {"annotate", "prompts", "base", "train", "evaluate"}
RERUNS = {"pd_data.sources": set(STAGES), "pd_data.annotate": AFTER_ANNOTATE, "pd_data.tasks": {"prompts", "base", "train", "evaluate"},
          "pd_model.train_base": {"base", "train", "evaluate"}, "pd_model.train": {"train", "evaluate"},
          "pd_eval.benchmark": {"evaluate"}, "pd_eval.schema": {"evaluate"}}


def _edited(monkeypatch, module: str, edit) -> None:
    real = plan_mod._source
    monkeypatch.setattr(plan_mod, "_source", lambda m: edit(real(m)) if m == module else real(m))


@pytest.mark.parametrize("module", sorted(RERUNS))
def test_editing_a_module_reruns_the_stages_that_run_it_and_their_descendants_only(tmp_path, monkeypatch, module):
    profile = load_profile("smoke", TINY)
    before = Plan.build(profile, StateDir(tmp_path)).keys
    _edited(monkeypatch, module, lambda text: text.replace('"""', '"""Edited prose. ', 1) + "\n# a comment\n")
    assert Plan.build(profile, StateDir(tmp_path)).keys == before  # prose reruns nothing
    _edited(monkeypatch, module, lambda text: text + "\nEDITED = 1\n")
    after = Plan.build(profile, StateDir(tmp_path)).keys
    assert {s for s in STAGES if after[s] != before[s]} == RERUNS[module]


def test_the_source_is_fingerprinted_once_and_a_file_touched_mid_run_orphans_nothing(prefect_engine, tmp_path, monkeypatch,
                                                                                     photos):
    import shutil

    from PIL import Image

    from conftest import folder_overrides
    from flows.stages import annotate, ingest
    from pd_data import sources

    root = shutil.copytree(photos[0], tmp_path / "photos")  # this test edits its copy
    over = folder_overrides(root, photos[1])
    calls = []
    real = sources.FolderSource.fingerprint
    monkeypatch.setattr(sources.FolderSource, "fingerprint", lambda self: calls.append(1) or real(self))
    plan = Plan.build(load_profile("smoke", over), StateDir(tmp_path / "state"))
    assert len(calls) == 1

    @flow
    def run_touching_the_source_between_stages():
        ingest(plan)
        Image.new("RGB", (48, 48), (1, 2, 3)).save(root / "IMG_0000.jpg")  # the source changes mid-run
        annotate(plan)

    run_touching_the_source_between_stages()
    assert len(calls) == 1  # the stages read the plan: no walk of the source again
    assert all(is_done(plan.dir(s)) for s in ("ingest", "annotate", "prompts"))  # every output under the run's keys
    # The next run sees the change: a new dataset key, the finished one left as it was.
    assert Plan.build(load_profile("smoke", over), StateDir(tmp_path / "state")).key("ingest") != plan.key("ingest")


def test_a_stage_removes_what_a_killed_run_left_behind(prefect_engine, tmp_path):
    from flows.runner import run_stage

    plan = Plan.build(load_profile("smoke", TINY), StateDir(tmp_path))
    out = plan.dir("annotate")
    (out / ".tmp-step-0000002-123").mkdir(parents=True)  # a checkpoint folder killed mid-save
    (out / ".annotations-00000.parquet.abc.tmp").write_bytes(b"half")  # an atomic write killed midway
    (out / "annotations-00000.parquet").write_bytes(b"kept")

    @flow
    def stage():
        return run_stage(plan, "annotate", lambda: {"files": sorted(p.name for p in out.iterdir())})

    assert stage() == {"files": ["annotations-00000.parquet"]}


def test_two_concurrent_runs_of_one_plan_compute_each_stage_once_and_keep_their_rows(prefect_engine, state_dir,
                                                                                      monkeypatch):
    from flows.stages import report_flow
    from pd_eval.store import query
    from pd_model import train_dist

    trained, real = [], train_dist.run_job
    monkeypatch.setattr(train_dist, "run_job", lambda job, **kw: trained.append(job.spec.name) or real(job, **kw))
    over = {**TINY, "train": {**TINY["train"], "oracles": False}}
    reports, errors = [], []

    def one_run():
        try:
            reports.append(report_flow("smoke", over))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    runs = [threading.Thread(target=one_run) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert not errors and len(reports) == 2
    plan = Plan.build(load_profile("smoke", over), StateDir.resolve())
    assert sorted(trained) == sorted(m.name for m in plan.models)  # each model once
    db = plan.state.db
    assert query(db, "SELECT count(*), count(DISTINCT run_id), min(status), max(status) FROM runs")[1] == [(2, 2, "completed", "completed")]
    (n, distinct, created), = query(db, "SELECT count(*), count(DISTINCT (model_id, task, metric)), count(DISTINCT created_at) "
                                        "FROM metrics WHERE eval_id = ?", [plan.key("evaluate")])[1]
    assert n == distinct > 0 and created == 1  # written once, by one run


def test_an_unwritable_state_directory_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "PD_STATE_DIR": str(blocker / "state")}
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "smoke"], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).parent.parent, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0] and str(blocker / "state") in lines[0], res.stderr
