"""scripts/gpu_check.py --tiny: every section of the GPU check on tiny CPU models, and its JSON whole.

One tiny run (real networks at tiny size, the same calls the GPU run makes) feeds the tests below; the
watchdog's promise (the JSON comes out by the deadline, whatever runs) is checked on a run cut short."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SECTIONS = ("machine", "training", "evaluation", "annotators", "e2e", "multi_gpu")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    saved = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    res = _run("--tiny", "--json-out", str(saved))
    assert res.returncode == 0, res.stderr[-4000:]
    printed = json.loads(res.stdout)  # stdout is the JSON alone: the stages' progress lines go to stderr
    assert printed == json.loads(saved.read_text())
    return printed


def test_the_record_is_whole(tiny):
    assert tiny["schema"] == "pd-gpu-check/1" and tiny["mode"] == "tiny"
    assert tiny["complete"] is True and tiny["errors"] == {}
    assert all(s in tiny for s in SECTIONS)
    b = tiny["budget"]
    assert 0 < b["used_s"] < b["allotted_s"]
    assert {s: v["status"] for s, v in b["sections"].items()} == {s: "ok" for s in (*SECTIONS, "training_compiled")}
    # What is skipped says why, and nothing was skipped for lack of time.
    assert all(n["what"] and n["why"] and n["for_lack_of_time"] is False for n in tiny["not_measured"])


def test_machine(tiny):
    m = tiny["machine"]
    assert m["device"] == "cpu" and m["gpu_count"] == 0 and m["gpus"] == []
    assert m["torch"] and m["packages"]["diffusers"] == "0.42.1"
    assert m["measured_bf16_matmul_tflops"] > 0


def test_training_rows_per_batch_and_compile(tiny):
    t = tiny["training"]
    assert t["size"] == "tiny" and t["latent_side"] * 8 == t["resolution"] and t["precision"].startswith("fp32")
    assert t["model"]["controlnet_params_M"] > 0 and t["model"]["unet_params_M"] > 0
    rows = {(r["batch"], r["compile"]): r for r in t["rows"]}
    assert set(rows) == {(1, False), (2, False), (1, True)}
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["step_s_median"] > 0 and r["peak_memory_gib"] > 0 and r["loss_finite"]
        assert r["gflop_per_step"] > 0 and "mfu_vs_datasheet_bf16" in r  # None: a CPU has no datasheet peak
    assert rows[(1, True)]["compile_backend"] == "eager"
    # FLOPs per step grow with the batch: a counter that missed the per-sample work would show here.
    assert 1.8 < rows[(2, False)]["gflop_per_step"] / rows[(1, False)]["gflop_per_step"] < 2.2


def test_evaluation_and_the_paper_projection(tiny):
    e = tiny["evaluation"]
    assert {(r["steps"], r["batch"]) for r in e["rows"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(r["samples_per_s"] > 0 and r["guidance_scale"] == 9.0 for r in e["rows"])
    p = e["paper_protocol"]
    assert p["samples"] == sum(p["counts"].values()) == 12_152 and p["steps"] == 100
    assert all(h > 0 for h in p["hours_on_one_device"].values())
    assert e["fid"]["feature_dim"] == 128 and e["fid"]["seconds_per_value"] > 0


def test_annotators(tiny):
    rows = tiny["annotators"]["rows"]
    assert {(r["annotator"], r["side_px"]) for r in rows} == {(a, s) for a in ("hed", "depth", "seg") for s in (32, 64)}
    assert all(r["images_per_s"] > 0 and r["device"] == "cpu" for r in rows)


def test_e2e_runs_the_paper_profile_to_stored_metrics(tiny):
    e = tiny["e2e"]
    assert e["profile"] == "paper" and set(e["stages"]) == {"inputs", "ingest", "annotate", "train", "evaluate"}
    s = e["stages"]
    assert s["ingest"]["rows_out"] == s["ingest"]["rows_in"] > 0 and s["annotate"]["rejects"] == 0
    assert s["train"]["models"] == 7 and s["train"]["finite_losses"]  # Prompt Diffusion and six CN(FT)s
    ev = s["evaluate"]
    assert ev["metric_rows_in_duckdb"] == ev["metric_rows_stored"] > 0 and "random-conv-v1" in ev["feature_extractors"]


def test_multi_gpu_says_why_not(tiny):
    assert tiny["multi_gpu"] is None
    assert any(n["what"] == "multi_gpu" and "1 device" in n["why"] for n in tiny["not_measured"])


def test_the_watchdog_prints_what_there_is_by_the_deadline():
    # The sections would take their time (a minute of budget); the deadline comes first, mid-section.
    res = _run("--tiny", "--budget-s", "60", "--deadline-s", "4", "--sections", "machine,training,training_compiled",
               timeout=120)
    assert res.returncode == 3, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["complete"] is False and "fired at" in out["budget"]["watchdog"]
    assert any("watchdog" in why for why in out["errors"].values())
