"""The stages and the flows that run them: ingest, annotate (+ evaluation prompts), base + train,
evaluate, report. Orchestration only: each stage calls into pd_* with paths and ids.

Every flow builds one frozen `Plan` and runs stages from it; each stage is one Prefect task (named
after it) computed at most once per key (`flows.runner.run_stage`): a finished stage shows as Cached
in the UI and returns its persisted summary; a stage another run is computing is waited for, then
read; a forced stage (`pd run --force STAGE`) and those that read it are recomputed from scratch."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.artifacts import inline_images, jsonable, publish_grid
from flows.plan import Plan
from flows.runner import (RETRIES, Force, Overrides, ProfileName, make_plan, require, run_mapped, run_stage,
                          with_parameter_help)
from pd_core.state import atomic_write_bytes, is_done, read_done
from pd_model.names import label


def register_views(plan: Plan) -> None:
    from pd_eval.store import register_data_views

    register_data_views(plan.state.db, plan.state.data)


# ---------------------------------------------------------------- ingest
@task(cache_policy=NO_CACHE, name="ingest-shard", task_run_name="ingest shard {s}", **RETRIES)
def ingest_shard_task(cfg, s: int, out_dir: Path, listed) -> dict:
    from pd_data.ingest import ingest_shard

    return ingest_shard(cfg, s, out_dir, listed)


def _ingest(plan: Plan) -> dict:
    """One Prefect task per shard (threads, or a Dask cluster: `flows.runner.run_mapped`)."""
    from pd_data.ingest import count_shards, listing, prepare, summarise
    from pd_data.sources import make_source

    t0, cfg, out = time.perf_counter(), plan.profile.data, plan.dir("ingest")
    source = make_source(cfg)
    prepare(out)
    listed = listing(source)
    done = run_mapped(ingest_shard_task, cfg, "ingest-shards", unmapped(cfg), list(range(count_shards(cfg, listed))),
                      unmapped(out), unmapped(listed))
    summary = summarise(out, source.name, len(listed[0]), sum(d["resumed"] for d in done), time.perf_counter() - t0)
    get_run_logger().info("ingest: %s", summary)
    create_table_artifact(key="ingest-summary", table=[{"rows in": summary["rows_in"], "rows out": summary["rows_out"],
                                                        "seconds": summary["seconds"], **{f"rejected: {k}": v for k, v in summary["rejects"].items()}}],
                          description=f"Ingestion of the {summary['source']} source")
    return summary


def ingest(plan: Plan) -> dict:
    summary = run_stage(plan, "ingest", lambda: _ingest(plan))
    register_views(plan)  # images and their rejects are queryable at once (`pd sql`)
    return summary


# ---------------------------------------------------------------- annotate (+ evaluation prompts)
def _annotate_shard_name(parameters: dict) -> str:
    """"annotate shard 3" for images-00003.parquet: the number its ingest shard's run shows."""
    return f"annotate shard {int(Path(parameters['images']).stem.rsplit('-', 1)[1])}"


@task(cache_policy=NO_CACHE, name="annotate-shard", task_run_name=_annotate_shard_name, **RETRIES)
def annotate_shard_task(images: Path, out: Path, annotators: dict[str, str], weights_dir: str | None,
                        gpu_workers: bool = False) -> dict:
    from pd_data.annotate import annotate_shard

    if gpu_workers:  # one worker per GPU: this worker's annotators on its own
        from pd_core.launch import pin_dask_worker_gpu

        pin_dask_worker_gpu()

    return annotate_shard(images, out, annotators, Path(weights_dir) if weights_dir else None)


def _annotate(plan: Plan) -> dict:
    from pd_data.shards import write_lineage

    cfg, out = plan.profile.data, plan.dir("annotate")
    shards = sorted(plan.dir("ingest").glob("images-*.parquet"))
    outs = [out / s.name.replace("images-", "annotations-") for s in shards]
    results = run_mapped(annotate_shard_task, cfg, "annotate-shards", shards, outs, unmapped(cfg.annotators),
                         unmapped(cfg.annotator_weights), unmapped(cfg.gpu_workers))
    write_lineage(out, plan.key("annotate"), plan.key("ingest"), cfg.annotators)
    summary = {"shards": len(results), "rows": sum(r["rows"] for r in results), "rejects": sum(r["rejects"] for r in results),
               "resumed": sum(r["resumed"] for r in results), "annotators": cfg.annotators}
    get_run_logger().info("annotate: %s", summary)
    return summary


@task(cache_policy=NO_CACHE, name="materialise-prompts", task_run_name="materialise prompts", **RETRIES)
def prompts_task(plan: Plan) -> dict:
    from pd_data.dataset import load_split
    from pd_data.prompts import materialise_prompts

    data = load_split(plan.dir("ingest"), plan.dir("annotate"), plan.profile.prompts.split, plan.profile.data.pairing)
    n = materialise_prompts(data, plan.eval_tasks, plan.profile.prompts, plan.dir("prompts") / "prompts.parquet")
    return {"rows": n, "tasks": list(plan.eval_tasks)}


def annotate(plan: Plan) -> dict:
    summary = run_stage(plan, "annotate", lambda: _annotate(plan))
    register_views(plan)  # the shards are queryable even if drawing the prompts fails
    run_stage(plan, "prompts", lambda: prompts_task(plan))
    register_views(plan)  # now with the `prompts` view, which needs their Parquet file
    return summary


# ---------------------------------------------------------------- train
def base_path(plan: Plan) -> str:
    """The frozen base every model trains on: the tiny base's folder, or Stable Diffusion's."""
    cfg = plan.profile.base
    return str(plan.dir("base")) if cfg.kind == "tiny" else cfg.pretrained_path


@task(cache_policy=NO_CACHE, name="train-base", task_run_name="train base")
def train_base_task(plan: Plan) -> dict:
    from pd_data.dataset import load_split
    from pd_model.base import load_base
    from pd_model.config import Sampler
    from pd_model.train_base import base_samples, train_base_folder

    out, ev = plan.dir("base"), plan.profile.eval
    summary = train_base_folder(plan.profile.base, load_split(plan.dir("ingest"), plan.dir("annotate"), "train"),
                                plan.profile.data.resolution, out, report_to=plan.profile.train.report_to)
    held_out = load_split(plan.dir("ingest"), plan.dir("annotate"), plan.profile.prompts.split)
    base_samples(load_base(out).freeze(), held_out, out / "samples.png",
                 Sampler(ev.scheduler, ev.steps, ev.guidance_scale),
                 plan.profile.data.resolution)
    return summary | provenance(plan.profile.base.mixed_precision, "cpu", "base.mixed_precision")  # the tiny base trains on the CPU


def _train_name(parameters: dict) -> str:
    return f"train {label(parameters['spec'].name)}"


@task(cache_policy=NO_CACHE, name="train-controlnet", task_run_name=_train_name)
def train_controlnet_task(plan: Plan, spec) -> dict:
    """One model; in this process, or on train.processes local processes (torchrun) when > 1."""
    from pd_model.train_dist import TrainJob

    out = plan.dir("train") / spec.name
    resumed = (out / "losses.json").exists()  # finished in an earlier, interrupted run of this stage
    key = plan.model_key(spec)
    reused = None if resumed or "train" in plan.force else reuse_model(plan, key, out)
    if not resumed and reused is None:
        job = TrainJob(base=base_path(plan), images=str(plan.dir("ingest")), annotations=str(plan.dir("annotate")),
                       cfg=plan.profile.train, spec=spec, out=str(out), validation_guidance=plan.profile.eval.guidance_scale,
                       pairing=plan.profile.data.pairing)
        train_job(job, lambda path, step: publish_grid(path, step, spec.name))
        atomic_write_bytes(out / MODEL_KEY, key.encode())
    elif resumed and not (out / MODEL_KEY).exists():
        atomic_write_bytes(out / MODEL_KEY, key.encode())  # killed between its last weights and its key
    elif reused is not None:
        get_run_logger().info("%s: trained already under the same model key %s (%s); copied, not retrained",
                              label(spec.name), key, reused)
    losses = json.loads((out / "losses.json").read_text())["loss"]
    return {"name": spec.name, "kind": spec.kind, "tasks": list(spec.tasks), "path": str(out), "steps": spec.steps,
            "final_loss": losses[-1], "resumed": resumed, "replicate": spec.replicate, "model_key": key,
            "reused_from": str(reused) if reused else None}


MODEL_KEY = "MODEL_KEY"  # a finished model folder's own key (`flows.plan.model_key`), written last


def reuse_model(plan: Plan, key: str, out: Path) -> Path | None:
    """A finished model folder of another train stage with the same model key, copied to `out` (through
    a temporary folder: a copy cut short is never taken for a model); None when there is none."""
    for marker in sorted(plan.dir("train").parent.glob(f"*/*/{MODEL_KEY}")):
        found = marker.parent
        if found.parent == out.parent or marker.read_text().strip() != key or not (found / "losses.json").exists():
            continue
        tmp = out.parent / f".{out.name}.copy.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(found, tmp, ignore=shutil.ignore_patterns("checkpoints"))
        shutil.rmtree(out, ignore_errors=True)  # a half-trained folder of an interrupted run: superseded
        tmp.rename(out)
        return found
    return None


def train_job(job, publish: Callable[[Path, int], None]) -> None:
    """The one training entry point of the train stage and retraining: in process, or torchrun when
    train.processes > 1 (whose grids are published once its workers are done)."""
    from pd_model.train_dist import launch, run_job

    if job.cfg.processes == 1:
        run_job(job, on_grid=publish)
        return
    launch(job)
    for path in sorted((Path(job.out) / "validation").glob("step-*.png")):
        publish(path, int(path.stem.split("-")[1]))


def provenance(setting: str | None, device: str | None, key: str = "") -> dict:
    """What a stage's summary records of where it ran (`pd_eval.provenance`); with `setting`, the
    training precision it resolved to on `device` too."""
    from pd_eval.provenance import machine_facts, training_precision

    return {"machine": machine_facts()} | ({"precision": training_precision(setting, device, key)} if setting else {})


def _train(plan: Plan) -> dict:
    from pd_model.train import resolve_device

    results = [train_controlnet_task(plan, spec) for spec in plan.models]
    create_table_artifact(key="training-summary", table=[{k: r[k] for k in ("name", "steps", "final_loss")} for r in results],
                          description="Final training loss of every model of this run")
    cfg = plan.profile.train
    return {"models": results, "budget_rule": cfg.budget_rule(len(plan.tasks)),
            **provenance(cfg.mixed_precision, resolve_device(cfg).type, "train.mixed_precision")}


def train(plan: Plan) -> dict:
    if plan.profile.base.kind == "tiny":
        run_stage(plan, "base", lambda: train_base_task(plan))
    return run_stage(plan, "train", lambda: _train(plan))


# ---------------------------------------------------------------- evaluate
@task(cache_policy=NO_CACHE, name="benchmark", task_run_name="generate and score")
def evaluate_task(plan: Plan) -> dict:
    from dataclasses import asdict

    from pd_eval.schema import ModelRow
    from pd_eval.evaluate import Split, evaluate_replicates, store

    models = read_done(plan.dir("train"))["models"]
    data = plan.profile.data
    where = Split(plan.dir("ingest"), plan.dir("annotate"), plan.profile.prompts.split, plan.dir("prompts") / "prompts.parquet",
                  data.pairing, annotators=data.annotators, annotator_weights=data.annotator_weights)
    result, per_replicate = evaluate_replicates(base_path(plan), models, plan.unseen_tasks, where, plan.profile.eval,
                                                plan.dir("evaluate"), cache=features_cache(plan))
    rows = [ModelRow(model_id=m["name"], eval_id="", kind=m["kind"], tasks=m["tasks"], path=m["path"], train_steps=m["steps"],
                     final_loss=m["final_loss"]) for m in models]
    n = store(plan.state.db, plan.key("evaluate"), rows, result)
    track_metrics(models, per_replicate, plan.key("evaluate"))
    table = [asdict(r) | {"eval_id": plan.key("evaluate"), "created_at": None} for r in result.metrics]
    create_table_artifact(key="benchmark-metrics", table=[{k: jsonable(v) for k, v in r.items()} for r in table],
                          description="Every metric of this evaluation (replicates pooled)")
    get_run_logger().info("evaluate: %d of %d samples generated by this run (the rest were on disk); %d metric rows stored",
                          result.computed, result.total, n)
    return {"eval_id": plan.key("evaluate"), "metrics": table, "rows_stored": n, "samples_computed": result.computed,
            "samples": result.total, "replicates": sorted(per_replicate), **provenance(None, None)}


def track_metrics(models: list[dict], per_replicate: dict, eval_id: str) -> None:
    """Each trained model's metrics into the tracker run that trained it (`train.report_to`), as
    `eval-<key>/<task>/<metric>[/<condition>]`: Prompt Diffusion's rows and its conditions
    (prompt-diffusion/empty-pair, ...), a CN(FT)'s rows of its own task; each replicate its own rows."""
    from pd_model.tracking import log_metrics

    for m in models:
        family, metrics = m["kind"], per_replicate.get(m.get("replicate", 0), [])
        own = [(r.metric if r.model_id == family else f"{r.metric}/{r.model_id.split('/', 1)[1]}", r.task, r.value)
               for r in metrics if (r.model_id == family or r.model_id.startswith(family + "/"))
               and (family == "prompt-diffusion" or r.task in m["tasks"])]
        if own:
            log_metrics(Path(m["path"]), own, prefix=f"eval-{eval_id[:12]}")


def features_cache(plan: Plan) -> Path:
    """Where the real images' features are kept between evaluations (`pd_eval.benchmark.reference_features`)."""
    return plan.state.root / "cache" / "reference-features"


def evaluate(plan: Plan) -> dict:
    return run_stage(plan, "evaluate", lambda: evaluate_task(plan))


# ---------------------------------------------------------------- report
@task(cache_policy=NO_CACHE, name="build-report", task_run_name="build report", **RETRIES)
def report_task(plan: Plan, run_id: str) -> str:
    from pd_eval.report import build_run_report

    curves = {m.name: plan.dir("train") / m.name / "losses.json" for m in plan.models}
    if plan.profile.base.kind == "tiny":
        curves["base (text->image)"] = plan.dir("base") / "losses.json"
    return str(build_run_report(plan.state.db, run_id, plan.profile, dict(plan.keys), curves, plan.dir("base") / "samples.png",
                                read_done(plan.dir("train")).get("budget_rule", "not recorded"), plan.dir("evaluate"),
                                plan.state.reports / run_id))


def report(plan: Plan) -> str:
    """Record this run in DuckDB (its own row in `runs`) and write its report."""
    from dataclasses import replace
    from datetime import datetime, timezone

    from pd_eval.schema import RunRow
    from pd_eval.provenance import run_provenance
    from pd_eval.report import report_tables
    from pd_eval.store import write_run

    started = plan.started_at or datetime.now(timezone.utc)  # the whole run's span, not the report's
    run_id = str(flow_run.root_flow_run_id or flow_run.get_id() or f"local-{started:%Y%m%dT%H%M%S}")
    stages = ("base", "train", "evaluate") if plan.profile.base.kind == "tiny" else ("train", "evaluate")
    precision, machine = run_provenance({s: read_done(plan.dir(s)) if is_done(plan.dir(s)) else None for s in stages})
    row = RunRow(run_id, plan.profile.name, plan.key("evaluate"), started, None, "running", None, plan.profile.model_dump_json(),
                 precision, machine)
    write_run(plan.state.db, row)
    try:
        path = report_task(plan, run_id)
    except BaseException:
        write_run(plan.state.db, replace(row, finished_at=datetime.now(timezone.utc), status="failed"))
        raise
    write_run(plan.state.db, replace(row, finished_at=datetime.now(timezone.utc), status="completed", report_path=path))
    # One artifact that opens in the UI: the report, its figures inlined (a file:// link or a relative
    # image does not load from a page served over http).
    create_markdown_artifact(key="benchmark-report", markdown=inline_images(Path(path).read_text(), Path(path).parent),
                             description=f"Report of run {run_id}; on disk: {path} and {Path(path).with_suffix('.html')}")
    for key, (names, rows) in report_tables(plan.state.db, run_id, plan.key("evaluate")).items():
        if rows:
            create_table_artifact(key=f"report-{key}", table=[dict(zip(names, map(jsonable, r))) for r in rows],
                                  description=f"{key} of run {run_id}")
    get_run_logger().info("report: %s", path)
    return path


# ---------------------------------------------------------------- flows
# Each flow calls its stages in order. Without `upstream`, the stages before its own must be done
# already (`require`); `full-benchmark` (flows/full_benchmark.py) runs them all.

@flow(name="ingest", log_prints=True)
@with_parameter_help
def ingest_flow(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
                force: Force = None) -> dict:
    """Ingest the profile's source into Parquet shards (one task per shard); returns the stage's summary.
    """
    return ingest(make_plan(profile, overrides, state_dir, trains=False, force=force))


@flow(name="annotate", log_prints=True)
@with_parameter_help
def annotate_flow(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
                  upstream: bool = True, force: Force = None) -> dict:
    """Annotate the ingested images (one task per shard) and materialise the evaluation prompts;
    returns the annotation summary.
    """
    plan = make_plan(profile, overrides, state_dir, trains=False, force=force)
    if upstream:
        ingest(plan)
    require(plan, "ingest")
    return annotate(plan)


@flow(name="train", log_prints=True)
@with_parameter_help
def train_flow(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
               upstream: bool = True, force: Force = None) -> dict:
    """Train the tiny base (if the profile has one), Prompt Diffusion and the CN(FT) baselines;
    returns the models trained.
    """
    plan = make_plan(profile, overrides, state_dir, force=force)
    if upstream:
        ingest(plan)
        annotate(plan)
    require(plan, "ingest", "prompts")
    return train(plan)


@flow(name="evaluate", log_prints=True)
@with_parameter_help
def evaluate_flow(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
                  upstream: bool = True, force: Force = None) -> dict:
    """Benchmark every trained model on the materialised prompts; the metrics go into DuckDB.
    """
    plan = make_plan(profile, overrides, state_dir, force=force)
    if upstream:
        ingest(plan)
        annotate(plan)
        train(plan)
    require(plan, "ingest", "prompts", "train")
    return evaluate(plan)


@flow(name="report", log_prints=True)
@with_parameter_help
def report_flow(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
                upstream: bool = True, force: Force = None) -> str:
    """Evaluate (if needed), record this run in DuckDB, and write its report; returns the report's path.
    """
    plan = make_plan(profile, overrides, state_dir, force=force)
    if upstream:
        ingest(plan)
        annotate(plan)
        train(plan)
        evaluate(plan)
    require(plan, "ingest", "prompts", "train", "evaluate")
    return report(plan)
