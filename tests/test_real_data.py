"""Data the project never made: a flat folder of photos with a captions CSV (no groups), annotated by
real backends, through the whole benchmark; configuration errors before anything starts."""
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import TINY, folder_overrides
from flows.plan import Plan
from flows.profiles import load_profile
from pd_core.state import StateDir
from pd_eval.store import query


def test_a_flat_folder_of_photos_runs_end_to_end(prefect_engine, state_dir, photos):
    from flows.full_benchmark import full_benchmark

    over = folder_overrides(*photos)
    report = full_benchmark("smoke", over)
    plan = Plan.build(load_profile("smoke", over), StateDir.resolve())
    # Only the tasks whose maps were annotated: hed trained, canny unseen; the broken file is a reject.
    assert plan.tasks == ("image->hed", "hed->image")
    prompts = pq.read_table(plan.dir("prompts") / "prompts.parquet").to_pylist()
    assert {p["task"] for p in prompts} == {"image->hed", "hed->image", "canny->image", "image->canny"}
    # Every image is its own group: each prompt's example comes from another image, never its query.
    assert all(p["example_id"] != p["query_id"] for p in prompts)
    db = plan.state.db
    assert query(db, "SELECT count(*) FROM images")[1] == [(20,)]
    assert query(db, "SELECT image_id, reason FROM rejects")[1] == [("broken.jpg", "not-an-image")]
    _, rows = query(db, "SELECT task, list(DISTINCT model_id ORDER BY model_id) FROM metrics WHERE metric IN ('fid', 'rmse') "
                        "AND task LIKE '%hed%' GROUP BY task ORDER BY task")
    assert rows == [("hed->image", ["baseline/copy-example", "baseline/mean-map", "cn-ft", "prompt-diffusion",
                                    "prompt-diffusion/empty-pair"]),
                    ("image->hed", ["baseline/copy-example", "baseline/copy-query", "baseline/mean-map", "cn-ft", "prompt-diffusion",
                                    "prompt-diffusion/empty-pair"])]  # one trained task a direction: no other task's pair
    # Controllability reads hed->image outputs back with the annotator that made the maps, named in its rows.
    _, readers = query(db, "SELECT DISTINCT feature_extractor FROM metrics WHERE metric LIKE 'ctrl_%' AND task = 'hed->image'")
    assert len(readers) == 1 and "hed" in readers[0][0].lower() and "demo-reader" not in readers[0][0]
    assert report.endswith(".md") and "image->hed" in open(report).read()


def test_prompts_and_models_follow_the_annotated_modalities():
    over = {"data": {"annotators": {"depth": "procedural", "canny": "procedural"}}, "eval": {"task_inference_queries": 0}}
    plan = Plan.build(load_profile("smoke", over), StateDir.resolve("/nonexistent"))
    assert plan.tasks == ("image->depth", "depth->image")
    assert plan.eval_tasks == ("image->depth", "depth->image", "canny->image", "image->canny")
    with pytest.raises(ValueError, match=r"lacks \['hed', 'seg'\].*eval.task_inference_queries=0"):
        load_profile("smoke", {"data": {"annotators": {"depth": "procedural"}}})
    with pytest.raises(ValueError, match="none of the maps the six training tasks need"):
        load_profile("smoke", {"data": {"annotators": {"canny": "procedural"}}, "eval": {"task_inference_queries": 0}})


@pytest.mark.parametrize("args, expected", [
    (["-o", "data.n_group=3"], "data.n_group=3: there is no such setting; did you mean data.n_groups?"),
    (["-o", "train.steps=0"], "train.steps=0: Input should be greater than or equal to 1"),
    (["-o", "data.source=folder", "-o", "data.source_path=/nonexistent/photos", "-o", 'data.annotators={"hed": "controlnet_aux"}',
      "-o", "eval.task_inference_queries=0"], "/nonexistent/photos is not a folder"),
])
def test_a_bad_setting_exits_2_with_one_clear_line_and_starts_nothing(tmp_path, args, expected):
    code = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
            "print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported'); sys.exit(rc)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, "run", "--profile", "smoke", *args], capture_output=True, text=True,
                         env={"PD_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr and "Traceback" not in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) <= 3  # one line, or a header and one per input
    assert res.stdout.strip() == "prefect not imported"  # no Prefect, so no temporary server either
    assert time.perf_counter() - t0 < 8
    assert not (tmp_path / "state").exists()


def test_pd_check_names_every_missing_input_then_passes_once_they_are_there(tmp_path, monkeypatch, capsys):
    """The paper profile: InstructPix2Pix, six annotators' weights, Stable Diffusion 1.5, Inception."""
    from flows.cli import main

    inputs = tmp_path / "inputs"
    monkeypatch.setenv("PD_INCEPTION_DIR", str(inputs))
    for var in ("PD_ANNOTATOR_WEIGHTS", "PD_SEG_WEIGHTS", "PD_DEPTH_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    args = ["check", "--profile", "paper", "-o", f"data.source_path={inputs}/ip2p", "-o", f"data.annotator_weights={inputs}/w",
            "-o", f"base.pretrained_path={inputs}/sd15"]
    assert main(args) == 1
    out = capsys.readouterr().out
    for needed in ("ip2p/seeds.json", "depth", "ControlNetHED.pth", "upernet-convnext-small", "scannet.pt",
                   "sd15 not found", "inception-2015-12-05.pt", "8 input(s) missing"):
        assert needed in out, needed
    for f in ("ip2p/seeds.json", "w/ControlNetHED.pth", "w/scannet.pt", "inception-2015-12-05.pt",
              *(f"w/{m}/{n}" for m in ("upernet-convnext-small", "dpt-hybrid-midas") for n in ("config.json", "model.safetensors")),
              "w/upernet-convnext-small/preprocessor_config.json", "sd15/scheduler/scheduler_config.json", "sd15/tokenizer/vocab.json",
              *(f"sd15/{m}/{n}" for m in ("unet", "vae", "text_encoder") for n in ("config.json", "model.safetensors"))):
        (inputs / f).parent.mkdir(parents=True, exist_ok=True)
        (inputs / f).write_text("[]")
    assert main(args) == 0, capsys.readouterr().out
    assert "every input is in place" in capsys.readouterr().out


def test_the_shards_are_queryable_as_soon_as_ingest_has_written_them(prefect_engine, state_dir):
    from flows.stages import ingest_flow

    ingest_flow("smoke", TINY)
    db = StateDir.resolve().db
    assert query(db, "SELECT count(*), count(DISTINCT group_id) FROM images")[1] == [(24, 6)]
    assert query(db, "SELECT sum(images) FROM splits")[1] == [(24,)]
    assert query(db, "SELECT count(*) FROM rejects")[1] == [(0,)]  # ingest's rejects files, before any annotation
