"""scripts/harness.py: interleaving really rotates and leaves warm-ups out, the statistics are right,
JSON comes out of numpy, torch, Paths and dataclasses and is written atomically, and the machine is named.
The scripts themselves import public project names only and keep to the package-code sizes."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts import harness

ROOT = Path(__file__).resolve().parents[1]


def test_interleave_rotates_the_order_and_times_no_warmup():
    calls = []
    conditions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.interleave(conditions, repeats=3, warmup=2, per_round=2)
    assert calls == list("aabbcc") + list("aabbcc" "bbccaa" "ccaabb")  # warm-ups, then ABC, BCA, CAB
    assert {name: len(t) for name, t in times.items()} == {"a": 6, "b": 6, "c": 6}
    assert [name for _, name in harness.schedule(["x", "y"], 4)] == list("xyyxxyyx")  # two: they alternate


def test_interleave_times_each_call():
    times = harness.interleave({"slow": lambda: time.sleep(0.02), "fast": lambda: None}, repeats=2, warmup=0)
    assert min(times["slow"]) >= 0.02 > max(times["fast"])
    assert harness.ratio(times["slow"], times["fast"]) > 10


def test_statistics_on_known_numbers():
    assert harness.summary([5, 1, 3, 2, 4]) == {"n": 5, "median": 3, "min": 1, "max": 5, "q1": 2, "q3": 4}
    assert harness.summary([7.0]) == {"n": 1, "median": 7.0, "min": 7.0, "max": 7.0, "q1": 7.0, "q3": 7.0}
    assert harness.median([3, 1, 2, 10]) == 2.5
    assert harness.ratio([2, 4, 6], [1, 2, 30]) == 2.0


def test_stopwatch_syncs_before_both_clock_reads():
    synced = []
    with harness.stopwatch(lambda: synced.append(time.perf_counter())) as lap:
        time.sleep(0.01)
    assert len(synced) == 2 and lap.seconds >= 0.01
    assert harness.device_sync("cpu") is None and harness.device_sync("cuda:0") is torch.cuda.synchronize


@dataclasses.dataclass
class Row:
    path: Path
    value: np.float32
    count: np.int64
    grid: np.ndarray
    weights: torch.Tensor


def test_jsonable_takes_numpy_torch_paths_and_dataclasses():
    row = Row(Path("/tmp/x"), np.float32(0.5), np.int64(3), np.arange(4).reshape(2, 2),
              torch.tensor([1.5, 2.0], dtype=torch.bfloat16))
    obj = {"row": row, ("ours", 8): torch.tensor(2.5), "dtype": torch.float32, "tags": {"b", "a"},
           "args": argparse.Namespace(batch=[8, 16]), "flag": np.bool_(True)}
    assert json.loads(json.dumps(harness.jsonable(obj))) == {
        "row": {"path": "/tmp/x", "value": 0.5, "count": 3, "grid": [[0, 1], [2, 3]], "weights": [1.5, 2.0]},
        "('ours', 8)": 2.5, "dtype": "torch.float32", "tags": ["a", "b"], "args": {"batch": [8, 16]}, "flag": True}


def test_write_json_is_atomic_and_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "out" / "result.json"
    harness.write_json(path, {"seconds": np.float64(1.25), "where": tmp_path})
    assert json.loads(path.read_text()) == {"seconds": 1.25, "where": str(tmp_path)}

    def no_rename(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", no_rename)  # a write that fails before it lands
    with pytest.raises(OSError, match="disk gone"):
        harness.write_json(path, {"seconds": 2.0})
    assert json.loads(path.read_text())["seconds"] == 1.25  # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left


def test_emit_prints_and_writes(tmp_path, capsys):
    harness.emit({"a": np.int32(1)}, tmp_path / "a.json")
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "a.json").read_text()) == {"a": 1}
    harness.append_line(tmp_path / "log.jsonl", {"x": 1})
    harness.append_line(tmp_path / "log.jsonl", {"x": 2})
    assert (tmp_path / "log.jsonl").read_text() == '{"x": 1}\n{"x": 2}\n'


def test_machine_names_cpu_flags_torch_and_date(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n")
    assert harness.cpu_info(info) == ("Intel Xeon", {"fpu", "avx512_bf16", "amx_bf16", "amx_tile"})
    m = harness.machine()
    assert set(m) == {"cpu", "arch", "amx", "avx512_bf16", "cores", "gpu", "torch", "torch_threads", "python", "date"}
    assert m["torch"] == torch.__version__ and m["torch_threads"] == torch.get_num_threads()
    assert m["cores"] == os.cpu_count() and m["date"][:4].isdigit()
    assert (m["amx"], m["avx512_bf16"]) == tuple(f in harness.cpu_info()[1] for f in ("amx_bf16", "avx512_bf16"))


def private_imports(source: str) -> list[str]:
    """Project names starting with `_` that `source` imports (its own module's privates are its own)."""
    project = ("pd_core", "pd_data", "pd_model", "pd_eval", "flows", "scripts")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in project:
            names = [*node.module.split("."), *(a.name for a in node.names)]
            found += [f"{node.module}.{n}" if n not in node.module else node.module for n in names if n.startswith("_")]
    return found


def test_scripts_import_public_project_names_only():
    assert private_imports("from pd_model.loop import _StepModule\nfrom torch.utils._pytree import x\n") == \
        ["pd_model.loop._StepModule"]
    found = {p.name: private_imports(p.read_text()) for p in sorted((ROOT / "scripts").glob("*.py"))}
    assert not {k: v for k, v in found.items() if v}


MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 400  # the project's rule for package code


def too_long(source: str, name: str) -> list[str]:
    """What in `source` (the file `name`) breaks the size rule: the module over MAX_MODULE_LINES lines, and
    every function, method or nested function over MAX_FUNCTION_LINES from its `def` line to its last."""
    n = len(source.splitlines())
    found = [f"{name} is {n} lines"] if n > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            found.append(f"{name}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines")
    return found


def test_the_packages_and_scripts_keep_functions_and_modules_short():
    body = "        x = 1\n" * 59
    assert too_long(f"class C:\n    def ok(self):\n{body}\n    def long(self):\n{body}        y = 2\n", "m.py") == \
        ["m.py:63 long is 61 lines"]  # 60 lines pass, 61 do not; methods count
    assert too_long("x = 1\n" * 401, "m.py") == ["m.py is 401 lines"]
    found = [f for d in ("pd_core", "pd_data", "pd_model", "pd_eval", "flows", "scripts")
             for p in sorted((ROOT / d).rglob("*.py")) for f in too_long(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "split these into functions that each do one job:\n" + "\n".join(found)
