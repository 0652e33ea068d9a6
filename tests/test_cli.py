"""`pd`'s command line: help and defaults on every argument, --version, choices from the registries,
--format for the table commands, and `pd generate`'s default model (the registry's current one)."""
import argparse
import csv
import io
import json
from datetime import datetime, timezone

import duckdb
import numpy as np
import pytest
from PIL import Image

from conftest import live_controlnet
from flows.cli import FORMATS, PLAN_STAGES, SCHEDULER_NAMES, _parser, main as pd_main
from flows.plan import STAGES
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
    assert set(SCHEDULER_NAMES) == set(SCHEDULERS) and PLAN_STAGES == STAGES
    edit = _subparsers(_parser())["edit"]
    modality = next(a for a in edit._actions if a.dest == "modality")
    assert set(modality.choices) == {t.target for t in TASKS.values() if t.source == "image"} >= {"depth", "hed", "seg"}
    with pytest.raises(SystemExit):
        pd_main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "(default: 50)" in text and "(default: ddim)" in text and "(default: 0)" in text
    with pytest.raises(SystemExit) as e:
        pd_main(["run", "--profile", "nightly"])
    assert e.value.code == 2 and "invalid choice: 'nightly'" in capsys.readouterr().err
    for name in PROFILES:
        assert _parser().parse_args(["run", "--profile", name]).profile == name


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
