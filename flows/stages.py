"""Stage flows: ingest, annotate, train, evaluate, report. Each runs on its own (running any missing
upstream stage first) and skips itself when its output for the same inputs is already complete."""
from __future__ import annotations

import base64
import json
import re
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.runtime import flow_run

from flows.plan import Plan
from flows.profiles import load_profile
from pd_data.state import StateDir, is_done, mark_done, read_done

Overrides = dict[str, Any] | None


def make_plan(profile: str, overrides: Overrides, state_dir: str | None) -> Plan:
    """The run's plan, after its whole configuration and every input it names are checked (preflight)."""
    from flows.preflight import require_inputs

    p = load_profile(profile, overrides)
    require_inputs(p)
    return Plan(p, StateDir.resolve(state_dir))


def require(plan: Plan, stage: str) -> None:
    if not is_done(plan.dir(stage)):
        raise RuntimeError(f"stage {stage!r} has not been run for these inputs (expected {plan.dir(stage)}); "
                           f"run it first or call this flow with upstream=True")


def after(upstream_flow, stage: str, profile: str, overrides: Overrides, state_dir: str | None, upstream: bool) -> Plan:
    """The plan of a stage whose input is `stage`: run that stage first (cached) or require it done."""
    plan = make_plan(profile, overrides, state_dir)
    if upstream:
        upstream_flow(profile, overrides, state_dir)
    require(plan, stage)
    return plan


def _cached(plan: Plan, stage: str) -> dict | None:
    out = plan.dir(stage)
    if is_done(out):
        get_run_logger().info("%s: already computed for these inputs (key %s) at %s; skipping", stage, plan.key(stage), out)
        return read_done(out)
    return None


# ---------------------------------------------------------------- ingest
@task(cache_policy=NO_CACHE, name="ingest-shard")
def ingest_shard_task(cfg, s: int, out_dir: Path, listed) -> dict:
    from pd_data.ingest import ingest_shard

    return ingest_shard(cfg, s, out_dir, listed)


def ingest_task(plan: Plan) -> dict:
    """One Prefect task per shard (threads, or Dask processes when data.workers > 1)."""
    import time

    from pd_data.ingest import count_shards, listing, prepare, summarise
    from pd_data.sources import make_source

    t0, cfg, out = time.perf_counter(), plan.profile.data, plan.dir("ingest")
    source = make_source(cfg)
    prepare(out)
    listed = listing(source)
    n = count_shards(cfg, listed)
    done = run_mapped(ingest_shard_task, cfg.workers, "ingest-shards", unmapped(cfg), list(range(n)), unmapped(out),
                      unmapped(listed))
    return summarise(out, source.name, len(listed[0]), sum(d["resumed"] for d in done), time.perf_counter() - t0)


@flow(name="ingest", log_prints=True)
def ingest_flow(profile: str = "smoke", overrides: Overrides = None, state_dir: str | None = None) -> dict:
    plan = make_plan(profile, overrides, state_dir)
    if (done := _cached(plan, "ingest")) is not None:
        return done
    summary = ingest_task(plan)
    mark_done(plan.dir("ingest"), summary)
    register_views(plan)  # images and their rejects are queryable at once (`pd sql`)
    get_run_logger().info("ingest: %s", summary)
    create_table_artifact(key="ingest-summary", table=[{"rows in": summary["rows_in"], "rows out": summary["rows_out"],
                                                        "seconds": summary["seconds"], **{f"rejected: {k}": v for k, v in summary["rejects"].items()}}],
                          description=f"Ingestion of the {summary['source']} source")
    return summary


# ---------------------------------------------------------------- annotate (+ evaluation prompts)
@task(cache_policy=NO_CACHE, name="annotate-shard")
def annotate_shard_task(images: Path, out: Path, annotators: dict[str, str], weights_dir: str | None) -> dict:
    from pd_data.annotate import annotate_shard

    return annotate_shard(images, out, annotators, Path(weights_dir) if weights_dir else None)


def write_lineage(plan: Plan) -> None:
    """Which dataset (ingest key) an annotation set was made from: the `annotations` view joins on it."""
    import pyarrow as pa

    from pd_data.shards import write_shard

    schema = pa.schema([("annotation_set", pa.string()), ("dataset", pa.string()), ("annotators", pa.string())])
    write_shard(plan.dir("annotate") / "lineage.parquet", [{"annotation_set": plan.key("annotate"), "dataset": plan.key("ingest"),
                                                            "annotators": json.dumps(plan.profile.data.annotators)}], schema)


def register_views(plan: Plan) -> None:
    from pd_eval.store import register_data_views

    register_data_views(plan.state.db, plan.state.data)


def run_mapped(task_fn, workers: int, name: str, *args) -> list:
    """`task_fn.map(*args)`: threads in this process, or a local Dask cluster of `workers` processes."""
    def fan_out() -> list:
        from prefect.futures import as_completed
        from tqdm.auto import tqdm

        futures = task_fn.map(*args)
        for _ in tqdm(as_completed(futures), total=len(futures), desc=name, unit="shard"):
            pass
        return [f.result() for f in futures]

    if workers == 1:
        return fan_out()
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                            "processes": True, "dashboard_address": None})
    return flow(fan_out, name=name, task_runner=runner)()


@task(cache_policy=NO_CACHE, name="materialise-prompts")
def prompts_task(plan: Plan) -> dict:
    from pd_data.dataset import load_split
    from pd_data.prompts import materialise_prompts

    data = load_split(plan.dir("ingest"), plan.dir("annotate"), plan.profile.prompts.split, plan.profile.data.pairing)
    n = materialise_prompts(data, plan.eval_tasks, plan.profile.prompts, plan.dir("prompts") / "prompts.parquet")
    return {"rows": n, "tasks": list(plan.eval_tasks)}


@flow(name="annotate", log_prints=True)
def annotate_flow(profile: str = "smoke", overrides: Overrides = None, state_dir: str | None = None,
                 upstream: bool = True) -> dict:
    plan = after(ingest_flow, "ingest", profile, overrides, state_dir, upstream)
    summary = _cached(plan, "annotate")
    if summary is None:
        shards = sorted(plan.dir("ingest").glob("images-*.parquet"))
        outs = [plan.dir("annotate") / s.name.replace("images-", "annotations-") for s in shards]
        cfg = plan.profile.data
        results = run_mapped(annotate_shard_task, cfg.workers, "annotate-shards", shards, outs,
                             unmapped(cfg.annotators), unmapped(cfg.annotator_weights))
        summary = {"shards": len(results), "rows": sum(r["rows"] for r in results),
                   "rejects": sum(r["rejects"] for r in results), "resumed": sum(r["resumed"] for r in results),
                   "annotators": plan.profile.data.annotators}
        write_lineage(plan)
        mark_done(plan.dir("annotate"), summary)
        get_run_logger().info("annotate: %s", summary)
    register_views(plan)  # the shards are queryable even if drawing the prompts fails
    if _cached(plan, "prompts") is None:
        mark_done(plan.dir("prompts"), prompts_task(plan))
        register_views(plan)  # now with the `prompts` view, which needs their Parquet file
    return summary


# ---------------------------------------------------------------- train
@task(cache_policy=NO_CACHE, name="train-base")
def train_base_task(plan: Plan) -> dict:
    from pd_data.dataset import load_split
    from pd_model.base import build_tiny_base
    from pd_model.train import save_losses, train_base

    out = plan.dir("base")
    cfg = plan.profile.base
    data = load_split(plan.dir("ingest"), plan.dir("annotate"), "train")
    base = build_tiny_base(cfg, sorted(set(data.captions.values())), plan.profile.data.resolution)
    losses = train_base(base, data, cfg)
    base.save(out)
    save_losses(out / "losses.json", losses)
    base_samples(base, plan, out / "samples.png")
    return {"path": str(out), "steps": cfg.train_steps, "final_loss": losses[-1] if losses else None}


def base_samples(base, plan: Plan, path: Path, n: int = 8) -> None:
    """Text -> image samples of the base from held-out captions: does it draw the scenes it is told?
    Each sample sits beside the held-out image of its caption, the picture it should resemble."""
    import numpy as np
    import torch

    from pd_data.dataset import load_split
    from pd_eval.visuals import caption_grid
    from pd_model.pipeline import PromptDiffusionPipeline

    held_out = load_split(plan.dir("ingest"), plan.dir("annotate"), plan.profile.prompts.split)
    ids = sorted(held_out.captions)[:n]
    captions = [held_out.captions[i] for i in ids]
    pipe = PromptDiffusionPipeline.from_parts(base, None, plan.profile.eval.scheduler)
    pipe.set_progress_bar_config(disable=True)
    res = plan.profile.data.resolution
    images = pipe(captions, num_inference_steps=plan.profile.eval.effective().steps, guidance_scale=plan.profile.eval.guidance_scale,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(captions))], output_type="np", height=res, width=res)
    real = np.stack([held_out.arrays[i]["image"] for i in ids])
    pairs = np.stack([x for ab in zip(images, real) for x in ab])
    labels = [x for c in captions for x in (f"generated: {c}", "held-out image")]
    caption_grid(pairs, labels).save(path)


@task(cache_policy=NO_CACHE, name="train-controlnet")
def train_controlnet_task(plan: Plan, mode: str, tasks: tuple[str, ...], steps: int, seed_offset: int, name: str) -> dict:
    """One model; in this process, or on train.processes local processes (torchrun) when > 1."""
    from pd_model.train_dist import TrainJob, launch, run_job

    out = plan.dir("train") / name
    resumed = (out / "losses.json").exists()  # finished in an earlier, interrupted run of this stage
    if not resumed:
        base_path = plan.dir("base") if plan.profile.base.kind == "tiny" else plan.profile.base.pretrained_path
        job = TrainJob(base=str(base_path), images=str(plan.dir("ingest")), annotations=str(plan.dir("annotate")),
                       cfg=plan.profile.train, mode=mode, tasks=tasks, steps=steps, seed_offset=seed_offset, out=str(out),
                       validation_guidance=plan.profile.eval.guidance_scale, pairing=plan.profile.data.pairing)
        publish = partial(publish_grid, model=name)
        if plan.profile.train.processes > 1:
            launch(job)  # the workers are outside this run: publish their grids once they are done
            for path in sorted((out / "validation").glob("step-*.png")):
                publish(path, int(path.stem.split("-")[1]))
        else:
            run_job(job, on_grid=publish)
    losses = json.loads((out / "losses.json").read_text())["loss"]
    return {"name": name, "path": str(out), "steps": steps, "final_loss": losses[-1], "resumed": resumed}


def publish_grid(path: Path, step: int, model: str) -> None:
    """A validation grid as an image artifact, inside a flow or task run only (elsewhere: nothing).

    The PNG is inlined as a data URL: the UI is served over http and will not load a file:// URL."""
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    key = re.sub(r"[^a-z0-9-]+", "-", f"validation-{model}".lower()).strip("-")
    create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(), key=key,
                          description=f"{model}, step {step}: example pair | query | output | target (`{path}`)")


def load_base_for(plan: Plan):
    from pd_model.base import load_base

    cfg = plan.profile.base
    return load_base(plan.dir("base") if cfg.kind == "tiny" else cfg.pretrained_path).freeze()


def model_dirs(plan: Plan) -> dict[str, tuple[str, tuple[str, ...]]]:
    """model name -> (mode, tasks): the joint model, one CN(FT) per task and, with train.oracles,
    one oracle CN(FT) per unseen task (a CN(FT) whose task is unseen is an oracle)."""
    models = {"prompt-diffusion": ("prompt_diffusion", plan.tasks)}
    if plan.profile.train.baseline_steps_per_task > 0:
        models |= {f"cn-ft_{t.replace('->', '-to-')}": ("cnft", (t,)) for t in plan.tasks}
        if plan.profile.train.oracles:
            models |= {f"cn-ft-oracle_{t.replace('->', '-to-')}": ("cnft", (t,)) for t in plan.unseen_tasks}
    return models


@flow(name="train", log_prints=True)
def train_flow(profile: str = "smoke", overrides: Overrides = None, state_dir: str | None = None,
              upstream: bool = True) -> dict:
    plan = after(annotate_flow, "annotate", profile, overrides, state_dir, upstream)
    from pd_model.train_dist import check_devices

    check_devices(plan.profile.train)  # before the base is trained, not after
    if plan.profile.base.kind == "tiny" and _cached(plan, "base") is None:
        mark_done(plan.dir("base"), train_base_task(plan))
    if (done := _cached(plan, "train")) is not None:
        return done
    cfg = plan.profile.train
    results = []
    for i, (name, (mode, tasks)) in enumerate(model_dirs(plan).items()):
        steps = cfg.steps if mode == "prompt_diffusion" else cfg.baseline_steps(len(plan.tasks))
        results.append(train_controlnet_task(plan, mode, tasks, steps, i, name))
    summary = {"models": results, "budget_rule": cfg.budget_rule(len(plan.tasks))}
    mark_done(plan.dir("train"), summary)
    create_table_artifact(key="training-summary", table=[{k: r[k] for k in ("name", "steps", "final_loss")} for r in results],
                          description="Final training loss of every model of this run")
    return summary


# ---------------------------------------------------------------- evaluate
@task(cache_policy=NO_CACHE, name="benchmark")
def benchmark_task(plan: Plan) -> dict:
    from pd_data.dataset import load_split
    from pd_eval.benchmark import models_under_test, run_benchmark
    from pd_model.pipeline import load_trained

    base = load_base_for(plan)
    nets, unets = {}, {}
    for name, (mode, tasks) in model_dirs(plan).items():
        _, net, unet = load_trained(plan.dir("train") / name)
        nets[name] = (mode, tasks, net)
        if unet is not None:  # trained with train.train_unet_decoder
            unets[name] = unet
    models = models_under_test(nets, plan.unseen_tasks, unets)
    data = load_split(plan.dir("ingest"), plan.dir("annotate"), plan.profile.prompts.split, plan.profile.data.pairing)
    train = load_split(plan.dir("ingest"), plan.dir("annotate"), "train")  # for the mean-map baseline
    prompts, cfg = plan.dir("prompts") / "prompts.parquet", plan.profile.eval
    metrics, samples = run_benchmark(base, models, data, prompts, cfg, plan.dir("evaluate"), train)
    confusion = []
    if cfg.task_inference_queries > 0:
        from pd_eval.task_inference import run_task_inference

        acc, confusion, more = run_task_inference(base.with_unet(unets.get("prompt-diffusion")), nets["prompt-diffusion"][2], data, prompts, cfg, plan.dir("evaluate"))
        metrics, samples = metrics + acc, samples + more
    return {"metrics": metrics, "samples": samples, "confusion": confusion}


@task(cache_policy=NO_CACHE, name="store-results")
def store_task(plan: Plan, result: dict) -> int:
    from datetime import datetime, timezone

    from pd_eval.store import write_rows

    eval_id, now = plan.key("evaluate"), datetime.now(timezone.utc)
    train = read_done(plan.dir("train"))
    model_rows = [{"model_id": m["name"], "eval_id": eval_id, "kind": mode, "tasks": list(tasks),
                   "path": m["path"], "train_steps": m["steps"], "final_loss": m["final_loss"]}
                  for m, (mode, tasks) in zip(train["models"], model_dirs(plan).values())]
    metric_rows = [{"eval_id": eval_id, "created_at": now, **{k: v for k, v in r.items() if k != "seconds"}}
                   for r in result["metrics"]]
    sample_rows = [{"eval_id": eval_id, **r} for r in result["samples"]]
    db = plan.state.db
    write_rows(db, "models", model_rows)
    write_rows(db, "samples", sample_rows)
    write_rows(db, "task_inference", [{"eval_id": eval_id, **r} for r in result["confusion"]])
    return write_rows(db, "metrics", metric_rows)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(profile: str = "smoke", overrides: Overrides = None, state_dir: str | None = None,
                 upstream: bool = True) -> dict:
    plan = after(train_flow, "train", profile, overrides, state_dir, upstream)
    if (done := _cached(plan, "evaluate")) is not None:
        return done
    result = benchmark_task(plan)
    n = store_task(plan, result)
    summary = {"eval_id": plan.key("evaluate"), "metrics": result["metrics"], "rows_stored": n}
    mark_done(plan.dir("evaluate"), summary)
    create_table_artifact(key="benchmark-metrics", table=result["metrics"], description="Every metric of this evaluation")
    return summary


# ---------------------------------------------------------------- report
@task(cache_policy=NO_CACHE, name="build-report")
def report_task(plan: Plan, run_id: str) -> str:
    from pd_eval.report import build_report
    from pd_eval.visuals import loss_plot

    curves = {}
    for name in model_dirs(plan):
        curves[name] = json.loads((plan.dir("train") / name / "losses.json").read_text())["loss"]
    if plan.profile.base.kind == "tiny":
        curves["base (text->image)"] = json.loads((plan.dir("base") / "losses.json").read_text())["loss"]
    out = plan.state.reports / run_id
    png = loss_plot(curves, out / "losses-src.png")
    if (plan.dir("base") / "samples.png").exists():
        import shutil

        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan.dir("base") / "samples.png", out / "base-samples.png")
    ev, tr = plan.profile.eval.effective(), plan.profile.train
    pair = f", example-pair guidance {ev.pair_guidance_scale}" if ev.pair_guidance_scale else ""
    pair += f", text guidance {ev.map_guidance_scale} for image->map" if ev.map_guidance_scale is not None else ""
    trained = ("each ControlNet with its own copy of the UNet decoder (train_unet_decoder=True; the base's encoder "
               "and text encoder frozen)" if tr.train_unet_decoder else "the ControlNets only (base frozen)")
    notes = [f"profile: {plan.profile.name}; evaluation protocol: {ev.protocol} "
             f"({ev.scheduler}, {ev.steps} steps, guidance {ev.guidance_scale}{pair})",
             f"trained: {trained}; CN(FT) budget: {read_done(plan.dir('train')).get('budget_rule', 'not recorded')}",
             f"pairing: {plan.profile.data.pairing} (where each training and evaluation prompt takes its example pair from)",
             "stage keys: " + ", ".join(f"{s}={plan.key(s)}" for s in ("ingest", "annotate", "prompts", "base", "train", "evaluate"))]
    return str(build_report(plan.state.db, run_id, plan.key("evaluate"), plan.profile.name, plan.dir("evaluate"), png, out, notes))


def _jsonable(v):
    """Table artifacts are JSON: NaN and infinities (an interval of one sample) become None."""
    import math

    return None if isinstance(v, float) and not math.isfinite(v) else v


@flow(name="report", log_prints=True)
def report_flow(profile: str = "smoke", overrides: Overrides = None, state_dir: str | None = None,
               upstream: bool = True) -> str:
    """Evaluate (if needed), record this run in DuckDB, and write its report."""
    from datetime import datetime, timezone

    from pd_eval.store import write_rows

    started = datetime.now(timezone.utc)
    plan = after(evaluate_flow, "evaluate", profile, overrides, state_dir, upstream)
    run_id = str(flow_run.root_flow_run_id or flow_run.get_id() or f"local-{started:%Y%m%dT%H%M%S}")
    row = {"run_id": run_id, "profile": profile, "eval_id": plan.key("evaluate"), "started_at": started,
           "finished_at": None, "status": "running", "report_path": None, "config": plan.profile.model_dump_json()}
    write_rows(plan.state.db, "runs", [row])
    try:
        path = report_task(plan, run_id)
    except BaseException:
        write_rows(plan.state.db, "runs", [row | {"finished_at": datetime.now(timezone.utc), "status": "failed"}])
        raise
    write_rows(plan.state.db, "runs", [row | {"finished_at": datetime.now(timezone.utc), "status": "completed", "report_path": path}])
    create_link_artifact(key="benchmark-report", link=f"file://{Path(path).with_suffix('.html')}", description="HTML report of this run")
    create_markdown_artifact(key="benchmark-report-md", markdown=Path(path).read_text(), description="Report of this run")
    from pd_eval.report import report_tables

    for key, (names, rows) in report_tables(plan.state.db, run_id, plan.key("evaluate")).items():
        if rows:
            create_table_artifact(key=f"report-{key}", table=[dict(zip(names, map(_jsonable, r))) for r in rows],
                                  description=f"{key} of run {run_id}")
    get_run_logger().info("report: %s", path)
    return path
