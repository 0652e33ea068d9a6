"""`pd`'s command line: help and defaults on every argument, --version, choices from the registries,
--format for the table commands, and `pd generate`'s default model (the registry's current one)."""
import argparse
import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from conftest import live_controlnet
from flows.cli import SCHEDULER_NAMES, _parser, main as pd_main
from flows.cli_parser import FORMATS
from flows.dag import FLOWS
from flows.profiles import PROFILES
from pd_data.tasks import TASKS
from pd_eval.registry import record
from pd_model.base import build_tiny_base
from pd_model.config import BaseModelConfig
from pd_model.pipeline import SCHEDULERS, save_trained
from pd_model.train import build_controlnet


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_argument_of_every_command_has_help_and_commands_a_description():
    for name, p in _subparsers(_parser()).items():
        assert p.description, name
        for a in p._actions:
            if not isinstance(a, argparse._HelpAction):
                assert a.help, f"pd {name}: {a.dest} has no help"


def test_defaults_are_shown_and_choices_come_from_the_registries(capsys):
    assert set(SCHEDULER_NAMES) == set(SCHEDULERS)
    edit = _subparsers(_parser())["edit"]
    modality = next(a for a in edit._actions if a.dest == "modality")
    assert set(modality.choices) == {t.target for t in TASKS.values() if t.source == "image"} >= {"depth", "hed", "seg"}
    with pytest.raises(SystemExit):
        pd_main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "(default: 20)" in text and "(default: ddim)" in text and "(default: 0)" in text
    with pytest.raises(SystemExit) as e:
        pd_main(["run", "--profile", "nightly"])
    assert e.value.code == 2 and "invalid choice: 'nightly'" in capsys.readouterr().err
    for name in PROFILES:
        assert _parser().parse_args(["run", "--profile", name]).profile == name


def test_pd_generate_samples_as_the_evaluation_does_and_every_flow_is_listed_once():
    from flows import full_benchmark, stages
    from pd_eval.config import EvalConfig
    from pd_model.config import Sampler

    args = _parser().parse_args(["generate", "--prompt", "a ball", "--pair", "a.png", "b.png", "--query", "q.png", "--out", "o.png"])
    assert Sampler(args.scheduler, args.steps, args.guidance, args.pair_guidance, args.negative) == Sampler() \
        == EvalConfig().sampler()
    run = _subparsers(_parser())["run"]
    assert next(a for a in run._actions if a.dest == "stage").choices == FLOWS
    flows_ = [full_benchmark.full_benchmark, stages.ingest_flow, stages.annotate_flow, stages.train_flow,
              stages.evaluate_flow, stages.report_flow]
    assert tuple(f.name for f in flows_) == FLOWS


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        pd_main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "pd 0.1.0"


def test_sql_formats(state_dir, capsys):
    (state_dir / "results").mkdir(parents=True)
    with duckdb.connect(str(state_dir / "results" / "pd.duckdb")) as con:
        con.execute("CREATE TABLE t AS SELECT * FROM (VALUES (1, 'a, b', 0.5), (2, 'c', NULL), (3, 'd', 'nan'::DOUBLE)) v(n, s, x)")
    outs = {}
    for fmt in FORMATS:
        assert pd_main(["sql", "SELECT * FROM t ORDER BY n", "--format", fmt]) == 0
        outs[fmt] = capsys.readouterr().out
    assert json.loads(outs["json"]) == [{"n": 1, "s": "a, b", "x": 0.5}, {"n": 2, "s": "c", "x": None},
                                      {"n": 3, "s": "d", "x": None}]
    assert list(csv.reader(io.StringIO(outs["csv"]))) == [["n", "s", "x"], ["1", "a, b", "0.5"], ["2", "c", ""], ["3", "d", "nan"]]
    assert outs["table"].splitlines()[0].split() == ["n", "|", "s", "|", "x"]


def _img(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_generate_uses_the_registrys_current_model_and_a_fresh_state_says_what_to_do(state_dir, tmp_path, capsys):
    for i in range(3):
        _img(i).save(tmp_path / f"{i}.png")
    args = ["generate", "--prompt", "a red ball", "--pair", str(tmp_path / "0.png"), str(tmp_path / "1.png"),
            "--query", str(tmp_path / "2.png"), "--steps", "2", "--guidance", "2"]
    assert pd_main([*args, "--out", str(tmp_path / "none.png")]) == 2
    assert "no trained model yet" in capsys.readouterr().err and not state_dir.exists()  # nothing created

    base = build_tiny_base(BaseModelConfig(), ["a red ball", "depth map"], 32).freeze()
    base.save(tmp_path / "base")
    folder = tmp_path / "candidate"
    save_trained(folder, live_controlnet(build_controlnet(base, "prompt-diffusion")), base, str(tmp_path / "base"),
                 "prompt-diffusion", ("image->depth",), False)
    db = state_dir / "results" / "pd.duckdb"
    db.parent.mkdir(parents=True)
    row = {"dataset": "default", "model_id": "r0001", "data_round": 1, "created_at": datetime.now(timezone.utc),
           "parent_id": None, "path": str(folder), "eval_id": "e", "train_steps": 1, "from_scratch": True, "final_loss": 0.1}
    record(db, row, True, "first model of this dataset")
    assert pd_main([*args, "--out", str(tmp_path / "gen.png")]) == 0
    assert Image.open(tmp_path / "gen.png").size == (32, 32)
    assert pd_main([*args, "--dataset", "other", "--out", str(tmp_path / "other.png")]) == 2
    assert "no current model of dataset 'other'" in capsys.readouterr().err
    # Editing with the same model: two steps write the predicted map beside the edit, in a folder made for them.
    edit = ["edit", "--text", "a blue ball", "--inverse-pair", str(tmp_path / "0.png"), str(tmp_path / "1.png"),
            "--steps", "2"]
    assert pd_main([*edit, "--image", str(tmp_path / "2.png"), "--out", str(tmp_path / "e.png")]) == 2
    assert "two-step editing needs --image and --forward-pair" in capsys.readouterr().err
    out = tmp_path / "edits" / "e.png"
    assert pd_main([*edit, "--image", str(tmp_path / "2.png"), "--forward-pair", str(tmp_path / "1.png"),
                    str(tmp_path / "0.png"), "--out", str(out)]) == 0
    assert Image.open(out).size == Image.open(out.with_name("e-depth.png")).size == (32, 32)


def _benchmark_run(db, run_id: str, eval_id: str, finished: datetime, status: str, models: dict[str, str]) -> None:
    from pd_eval.schema import ModelRow, RunRow
    from pd_eval.store import replace_evaluation, write_run

    write_run(db, RunRow(run_id=run_id, profile="demo", eval_id=eval_id, started_at=finished, finished_at=finished,
                         status=status, report_path=None, config={}))
    replace_evaluation(db, eval_id, [ModelRow(model_id=name, eval_id=eval_id, kind=kind, tasks=["image->depth"],
                                              path=f"/models/{eval_id}/{name}", train_steps=960, final_loss=0.25)
                                     for name, kind in models.items()])


def test_models_after_a_benchmark_lists_its_models_and_then_the_registry(state_dir, capsys):
    """A benchmark trains models that never enter the registry: `pd models` lists the latest completed
    run's models (not an older run's, nor a failed one's), and the registry once it has entries."""
    db = state_dir / "results" / "pd.duckdb"
    db.parent.mkdir(parents=True)
    day = datetime(2026, 12, 3, 10, 0, tzinfo=timezone.utc)
    _benchmark_run(db, "old", "e0", day, "completed", {"prompt-diffusion": "prompt-diffusion"})
    _benchmark_run(db, "new", "e1", day.replace(hour=11), "completed",
                   {"prompt-diffusion": "prompt-diffusion", "cn-ft-depth": "cn-ft"})
    _benchmark_run(db, "broken", "e2", day.replace(hour=12), "failed", {"prompt-diffusion": "prompt-diffusion"})
    assert pd_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "benchmark models of run new (profile demo, finished 2026-12-03 11:00):" in out
    assert "/models/e1/prompt-diffusion" in out and "/models/e1/cn-ft-depth" in out and "/models/e0/" not in out
    assert "/models/e2/" not in out and "model registry: no models yet" in out
    assert pd_main(["models", "--benchmark", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "prompt-diffusion", "kind": "prompt-diffusion", "path": "/models/e1/prompt-diffusion", "steps": 960,
         "final_loss": 0.25},
        {"name": "cn-ft-depth", "kind": "cn-ft", "path": "/models/e1/cn-ft-depth", "steps": 960, "final_loss": 0.25}]

    record(db, {"dataset": "default", "model_id": "r0001", "data_round": 1, "created_at": datetime.now(timezone.utc),
                "parent_id": None, "path": "/live/r0001", "eval_id": "r", "train_steps": 1, "from_scratch": True,
                "final_loss": 0.1}, True, "first model of this dataset")
    assert pd_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "/models/e1/prompt-diffusion" in out and "model registry (retraining rounds):" in out and "r0001" in out
    assert pd_main(["models", "--dataset", "default"]) == 0  # one dataset's registry only
    out = capsys.readouterr().out
    assert "r0001" in out and "benchmark models" not in out


def test_generate_reads_a_benchmark_model_recorded_under_the_old_kind_spelling(state_dir, tmp_path, capsys):
    """Results databases written before the kinds were unified say 'prompt_diffusion' in models.kind."""
    from flows.cli import _model_folder

    db = state_dir / "results" / "pd.duckdb"
    db.parent.mkdir(parents=True)
    _benchmark_run(db, "old", "e0", datetime(2026, 11, 30, tzinfo=timezone.utc), "completed",
                   {"prompt-diffusion": "prompt_diffusion", "cn-ft-depth": "cnft"})
    assert _model_folder(argparse.Namespace(model=None, dataset="default")) == "/models/e0/prompt-diffusion"


def test_pd_run_and_every_flow_default_to_the_profile_make_benchmark_runs():
    """`make benchmark` runs the demo: `pd run` without --profile, and a flow run without a profile
    parameter, run the same."""
    import inspect
    import re

    from flows.full_benchmark import full_benchmark
    from flows.retrain import retrain_flow, watch_source_flow
    from flows.stages import annotate_flow, evaluate_flow, ingest_flow, report_flow, train_flow

    make = re.search(r"^PROFILE \?= (\w+)$", (Path(__file__).parents[1] / "Makefile").read_text(), re.M).group(1)
    assert make == "demo" and _parser().parse_args(["run"]).profile == make
    for f in (full_benchmark, ingest_flow, annotate_flow, train_flow, evaluate_flow, report_flow, retrain_flow,
              watch_source_flow):
        assert inspect.signature(f.fn).parameters["profile"].default == make, f.name


def test_a_pd_run_ended_by_sigterm_stops_every_process_it_started(tmp_path):
    """Without PREFECT_API_URL, `pd run` starts Prefect's temporary server (a uvicorn child); SIGTERM
    must take it along, not leave it running orphaned."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = {**os.environ, "PD_STATE_DIR": str(tmp_path / "state"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "run.log"
    with open(log, "w") as out:  # a file, not a pipe: an orphan holding the pipe would hang the test
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--profile", "smoke", "-o", "data.n_groups=6"],
                                cwd=Path(__file__).parents[1], env=env, stdout=out, stderr=subprocess.STDOUT)
    kids: list = []
    try:
        deadline = time.monotonic() + 180
        while not any("uvicorn" in " ".join(k.cmdline()) for k in kids):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                kids = []
        kids = psutil.Process(proc.pid).children(recursive=True)  # all of them, once the server is up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
        _, alive = psutil.wait_procs(kids, timeout=5)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
        assert "pd run: ended by SIGTERM; stopped" in log.read_text()
    finally:
        for p in [psutil.Process(proc.pid), *kids] if proc.poll() is None else kids:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
