"""End to end through the real Prefect engine: Parquet, checkpoints, DuckDB rows, report, caching."""
import json
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq

from conftest import TINY
from flows.full_benchmark import full_benchmark
from flows.dag import STAGES
from flows.plan import Plan
from flows.profiles import load_profile
from pd_core.state import StateDir
from pd_eval.store import query


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _model_mtimes(folder):
    """The models' files but their tracker logs, which each evaluation appends its metrics to."""
    return {p: t for p, t in _mtimes(folder).items() if "logs" not in p.relative_to(folder).parts}


def stage_states(flow_state) -> dict[str, str]:
    """stage -> the state name of its task run (Cached, Completed, ...) in the flow run of `flow_state`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    assert flow_state.is_completed(), flow_state
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {r.name: r.state.name for r in runs if r.name in STAGES}  # a stage's task run is named after it


def test_smoke_flow_end_to_end_then_cached_then_partial_rerun(prefect_engine, state_dir, caplog):
    caplog.set_level(logging.INFO)
    t0 = time.monotonic()
    report = full_benchmark("smoke", TINY)
    elapsed = time.monotonic() - t0
    plan = Plan.build(load_profile("smoke", TINY), StateDir.resolve())

    # 1. Parquet: every image of 6 groups x 2 layouts x 2 twins, six maps each, 3 prompts x (6 trained + 4 unseen tasks).
    n_images = sum(pq.read_metadata(p).num_rows for p in plan.dir("ingest").glob("images-*.parquet"))
    n_maps = sum(pq.read_metadata(p).num_rows for p in plan.dir("annotate").glob("annotations-*.parquet"))
    prompts = pq.read_table(plan.dir("prompts") / "prompts.parquet").to_pylist()
    assert (n_images, n_maps, len(prompts)) == (24, 144, 30)
    assert {p["task"] for p in prompts} == set(plan.eval_tasks) and len(plan.unseen_tasks) == 4

    # 2. Checkpoints: base in diffusers layout, Prompt Diffusion, six CN(FT) and four oracles, all safetensors.
    assert (plan.dir("base") / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (plan.dir("base") / "samples.png").exists()
    assert all((plan.dir("train") / n / "pipeline.json").exists() for n in ("prompt-diffusion", "cn-ft_image-to-depth"))
    ckpts = sorted(p.parent.parent.name for p in plan.dir("train").glob("*/controlnet/diffusion_pytorch_model.safetensors"))
    assert len(ckpts) == 11 and "prompt-diffusion" in ckpts and "cn-ft-oracle_canny-to-image" in ckpts

    # 2a. A trained model folder is a diffusers pipeline folder: one line loads it, and it generates.
    import numpy as np
    import torch
    from PIL import Image

    from pd_model.pipeline import PromptDiffusionPipeline

    pipe = PromptDiffusionPipeline.from_pretrained(plan.dir("train") / "prompt-diffusion")
    pipe.set_progress_bar_config(disable=True)
    first = prompts[0]
    ex = Image.new("RGB", (32, 32), (90, 90, 90))
    out = pipe(first["text"], image_pair=(ex, ex), image=ex, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32) and np.asarray(out.images[0]).std() > 0

    # 2b. Tracking (train.report_to=tensorboard): the training's scalars and this evaluation's metrics in one run.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(plan.dir("train") / "prompt-diffusion" / "logs")).Reload().Tags()["scalars"]
    evaluation = f"eval-{plan.key('evaluate')[:12]}"
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", f"{evaluation}/image->depth/rmse",
            f"{evaluation}/canny->image/fid/empty-pair"} <= {t.replace("-to-", "->") for t in tags}, tags

    # 3. DuckDB. Who answers each task: trained image->map x (PD, CN(FT), PD with the pair zeroed and with
    #    another task's pair, 3 baselines) = 7; trained map->image x (the 4 models, copy-example, mean image)
    #    = 6; unseen map->image x (PD and its 2 pair conditions, CN(FT) nearest and oracle, 2 baselines) = 7;
    #    image->canny x (those 5 + 3 baselines) = 8. FID + KID on map->image; RMSE + SSIM + PSNR everywhere
    #    (map->image: against the query's own true image); controllability on the 6 map->image tasks (and the
    #    true image as ceiling: +1 answer each) with depth 1, hed 2, seg 3, canny 1, scribble 2, normal 1
    #    metrics, plus the re-annotator's and the mean map's headline per modality and its `informative` row;
    #    example sensitivity: 2 conditions x 10 tasks, 2 rows each.
    db = plan.state.db
    _, per_metric = query(db, "SELECT metric, count(*) FROM metrics GROUP BY ALL ORDER BY 1")
    fid = 3 * 6 + 3 * 7
    paired = 3 * 7 + fid + 8
    assert per_metric == [("accuracy", 2), ("ctrl_angle", 8 + 2), ("ctrl_dataset_miou", 7 + 2), ("ctrl_f1", 8 + 2),
                          ("ctrl_miou", 7), ("ctrl_pixel_acc", 7), ("ctrl_rmse", 7 + 7 + 8 + 2), ("ctrl_ssim", 7 + 8 + 2 + 2),
                          ("fid", fid), ("informative", 6), ("kid", fid), ("output_change", 20), ("paired_diff_mse", 20),
                          ("psnr", paired), ("rmse", paired), ("ssim", paired)]
    _, base = query(db, "SELECT model_id, count(*) FROM metrics WHERE model_id LIKE 'baseline/%' GROUP BY ALL ORDER BY 1")
    ctrl = 1 + 2 + 3 + 1 + 2 + 1
    assert base == [("baseline/copy-example", 4 * 3 + 6 * 5 + ctrl + 1), ("baseline/copy-query", 12),
                    ("baseline/mean-map", 4 * 3 + 6 * 5 + ctrl), ("baseline/true-image", ctrl)]
    # 3a. In-context task inference: 3 queries x 3 example tasks, a 3 x 4 confusion matrix (the fourth
    #     column: the example copied) for the model and for the copy-example baseline, which earns nothing.
    _, acc = query(db, "SELECT model_id, task, n, value BETWEEN 0 AND 1 FROM metrics WHERE metric = 'accuracy' ORDER BY 1")
    assert acc == [("baseline/copy-example", "task-inference", 9, True), ("prompt-diffusion/no-text", "task-inference", 9, True)]
    assert query(db, "SELECT value FROM metrics WHERE metric = 'accuracy' AND model_id LIKE 'baseline/%'")[1] == [(0.0,)]
    _, cells = query(db, "SELECT model_id, count(*), sum(count), count(DISTINCT shown_task) FROM task_inference GROUP BY 1 ORDER BY 1")
    assert cells == [("baseline/copy-example", 12, 9, 3), ("prompt-diffusion/no-text", 12, 9, 3)]
    _, gen = query(db, "SELECT task, list(DISTINCT condition ORDER BY condition), count(*), min(n) FROM generalization "
                       "WHERE metric IN ('fid', 'rmse') GROUP BY task ORDER BY task")
    conditions = ["baseline/copy-example", "baseline/mean-map", "cn-ft/nearest", "cn-ft/oracle", "prompt-diffusion",
                  "prompt-diffusion/empty-pair", "prompt-diffusion/other-pair"]
    assert gen == [(t, sorted(conditions + (["baseline/copy-query"] if t == "image->canny" else [])),
                    8 if t == "image->canny" else 7 * 2, 3) for t in sorted(plan.unseen_tasks)]  # map->image: FID and paired RMSE
    _, kids = query(db, "SELECT DISTINCT feature_extractor FROM metrics WHERE metric IN ('fid', 'kid')")
    assert kids == [("random-conv-v1",)]
    names, rows = query(db, "SELECT model, \"rmse_image->depth\", \"fid_seg->image\" FROM latest_paper_table "
                            "WHERE profile = 'smoke' ORDER BY model")
    assert [r[0] for r in rows] == ["baseline/copy-example", "baseline/copy-query", "baseline/mean-map", "cn-ft", "prompt-diffusion"]
    assert all(0 < r[1] < 1 for r in rows) and all(r[2] >= 0 for r in rows[3:]) and rows[0][2] >= 0
    _, runs = query(db, "SELECT status, report_path FROM runs")
    assert runs == [("completed", report)]
    # 3c. The run's row spans the whole flow run (from its plan, before ingestion), not the report stage
    #     alone, and keeps where each stage ran and the precision it trained in.
    _, [(span, precision, cpus)] = query(db, "SELECT epoch(finished_at - started_at), precision, "
                                         "[machine->>('$.' || s || '.cpu') FOR s IN ['base', 'train', 'evaluate', 'report']] FROM runs")
    since_ingest = Path(report).stat().st_mtime - (plan.dir("ingest") / "_DONE.json").stat().st_mtime
    assert since_ingest < span < elapsed, (since_ingest, span, elapsed)
    assert precision == "base fp32 (base.mixed_precision=auto on cpu); train fp32 (train.mixed_precision=auto on cpu)"
    from pd_eval.provenance import machine_facts

    assert cpus == [machine_facts()["cpu"]] * 4

    # 3b. Views over the shards answer data questions.
    _, per = query(db, "SELECT i.split, a.modality, count(*) FROM annotations a JOIN images i USING (dataset, image_id) "
                       "GROUP BY ALL ORDER BY ALL")
    assert sum(r[2] for r in per) == 144 and {r[1] for r in per} == {"depth", "hed", "seg", "canny", "scribble", "normal"}
    assert query(db, "SELECT sum(images) FROM splits")[1] == [(24,)]
    _, per_task = query(db, "SELECT prompt_set, task, count(*) FROM prompts GROUP BY ALL ORDER BY task")
    assert len(per_task) == 10 and {r[0] for r in per_task} == {plan.key("prompts")} and {r[2] for r in per_task} == {3}
    assert query(db, "SELECT reason, count(*) FROM rejects GROUP BY reason")[1] == []

    # 4. Report: Markdown and HTML with the table, grids and loss curves.
    md = open(report).read()
    assert "Table 1" in md and "prompt-diffusion" in md and "Prompt Diffusion [paper]" in md
    grids = {p.name for p in plan.state.reports.glob("*/*__*.png")}
    # a grid per model request: Prompt Diffusion and its two pair conditions on 10 tasks, 6 CN(FT), CN(FT) nearest
    # and oracle on 4 unseen tasks, task inference
    assert (plan.state.reports.glob("*/report.html")) and len(grids) == 10 * 3 + 6 + 4 * 2 + 1
    assert {"prompt-diffusion__canny-to-image.png", "cn-ft_oracle__image-to-canny.png"} <= grids
    assert "losses.png" in md and "base-samples.png" in md
    assert "CN(FT) budget: equal steps: each of the 6 CN(FT) models 2 steps" in md  # the rule the run used
    assert md.split("\n\n")[1].startswith("Verdict: Prompt Diffusion beats CN(FT) on ")  # first, under the title
    assert md.index("## Where this ran") < md.index("## Table 1, image->map") < md.index("## Table 1, map->image")
    assert f"- trained on: {machine_facts()['cpu']}" in md and "- evaluated on: " in md
    assert "beat the trivial baselines" in md and md.count(" (RMSE) | ") == 4  # a claims row per image->map task
    assert md.count("->image (control ") == 6 and "pairing: other-layout" in md  # map->image claims by controllability
    assert "## Unseen tasks: zero-shot generalisation" in md and "## In-context task inference (text removed)" in md
    folder = plan.state.reports / report.split("/")[-2]
    for png in ("bars.png", "generalization.png", "task-inference.png"):
        assert (folder / png).stat().st_size > 1000 and f"]({png})" in md
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    keys = {a.key for a in artifacts}
    assert {"report-paper-table", "report-generalization", "report-task-inference", "benchmark-report"} <= keys

    # 4a. Progress of every long stage, in the run's log and as progress artifacts.
    lines = [r.getMessage() for r in caplog.records]
    n = query(db, "SELECT count(*) FROM samples")[1][0][0]  # every generated sample, task inference included
    for done in ("annotate shards: 1/1 shards (100%)", "train base: 8/8 steps (100%)",
                 "train prompt-diffusion: 4/4 steps (100%)", f"evaluate: generated samples: {n}/{n} samples (100%)"):
        assert any(m.startswith(done) for m in lines), (done, [m for m in lines if m.startswith(done.split(":")[0])])
    assert any(m.startswith(f"evaluate: generated samples: 0/{n} samples (0%)") and "ETA" in m for m in lines)
    assert {"annotate-shards", "train-base", "train-prompt-diffusion", "evaluate-samples",
            "evaluate-metrics"} <= {a.key for a in artifacts if a.type == "progress"}

    # 5. Same inputs again: every stage's task is Cached (Prefect's cache, keyed by the plan); nothing is rewritten.
    before = _model_mtimes(plan.state.root / "models")
    assert stage_states(full_benchmark("smoke", TINY, return_state=True)) == dict.fromkeys(STAGES, "Cached")
    assert _model_mtimes(plan.state.root / "models") == before
    assert query(db, "SELECT count(*) FROM runs")[1] == [(2,)]

    # 6. A new evaluation parameter reruns only the evaluation.
    changed = json.loads(json.dumps(TINY))
    changed["eval"]["guidance_scale"] = 1.5
    assert stage_states(full_benchmark("smoke", changed, return_state=True)) == {**dict.fromkeys(STAGES, "Cached"),
                                                                                  "evaluate": "Completed"}
    assert _model_mtimes(plan.state.root / "models") == before
    assert query(db, "SELECT count(DISTINCT eval_id) FROM metrics")[1] == [(2,)]


def test_a_stage_runs_its_missing_upstream_and_refuses_without_it(prefect_engine, state_dir):
    import pytest

    from flows.stages import annotate_flow

    with pytest.raises(RuntimeError, match="has not been run"):
        annotate_flow("smoke", TINY, upstream=False)
    summary = annotate_flow("smoke", TINY)
    assert summary["rows"] == 144
