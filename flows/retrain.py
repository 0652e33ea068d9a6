"""Scheduled retraining: new data in, a candidate trained and benchmarked, promoted only if better.

One run of `retrain` is one round for a live dataset (`<state>/data/live/<dataset>/`):
1. incremental ingestion: only new or changed source items are written and annotated, deleted ones
   are marked (`pd_data.incremental`, tracked in DuckDB);
2. the evaluation split is frozen into a benchmark on the first round, so every candidate and the
   current model are scored on identical prompts, seeds and images;
3. the candidate continues from the current model (or starts from scratch, by parameter) on the
   updated train split; the tiny base is trained once per dataset, as Stable Diffusion is not retrained;
4. the candidate and the current model are benchmarked (the current one again only if the
   evaluation settings changed), the promotion rule decides, and the registry records it all;
5. a short report says what data came in, what changed in the metrics and what was decided.
A round that crashed after its data was committed is resumed by the next run (same round, its
training checkpoints reused) before any new data is taken in.
"""
from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_grid
from flows.runner import Overrides, ProfileName, make_plan
from flows.stages import features_cache, train_job
from pd_core.state import atomic_write_bytes, atomic_write_json, is_done, mark_done, read_done, stage_lock
from pd_data.tasks import TRAINING_TASKS


def live_dir(plan, dataset: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset):
        raise ValueError(f"dataset name {dataset!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
    return plan.state.data / "live" / dataset


@task(cache_policy=NO_CACHE, name="incremental-ingest", task_run_name="incremental ingest {dataset}")
def ingest_round(plan, dataset: str) -> dict:
    from pd_data.incremental import update_live
    from pd_eval.registry import pending_round

    if (row := pending_round(plan.state.db, dataset)) is not None:
        get_run_logger().info("round %d of %s committed its data but recorded no candidate: resuming it", row["round"], dataset)
        return row | {"resumed": True}
    return update_live(plan.profile.data, live_dir(plan, dataset), plan.state.db, dataset) | {"resumed": False}


def frozen_benchmark(plan, dataset: str) -> Path:
    """The benchmark of this dataset (split images, maps and prompts), made once on the first round."""
    from pd_data.dataset import load_split
    from pd_data.incremental import snapshot_split
    from pd_data.prompts import materialise_prompts

    live = live_dir(plan, dataset)
    out = live / "benchmark"
    if not is_done(out):
        split = plan.profile.prompts.split
        snapshot_split(live, plan.state.db, dataset, split, out)
        data = load_split(out, out, split, plan.profile.data.pairing)
        n = materialise_prompts(data, TRAINING_TASKS, plan.profile.prompts, out / "prompts.parquet")
        mark_done(out, {"prompts": n, "split": split})
    return out


@task(cache_policy=NO_CACHE, name="retrain-base", task_run_name="train base {dataset}")
def base_for(plan, dataset: str) -> str:
    """The base's folder: the tiny base, trained once per live dataset on its first round's train
    split (resumable, as the benchmark's); SD 1.5 is loaded from its own."""
    from pd_data.incremental import load_live_split
    from pd_model.train_base import train_base_folder

    cfg = plan.profile.base
    if cfg.kind != "tiny":
        return cfg.pretrained_path
    out = live_dir(plan, dataset) / "base"
    if not is_done(out):
        data = load_live_split(live_dir(plan, dataset), plan.state.db, dataset, "train")
        mark_done(out, train_base_folder(cfg, data, plan.profile.data.resolution, out, report_to=plan.profile.train.report_to))
    return str(out)


@task(cache_policy=NO_CACHE, name="train-candidate", task_run_name="train candidate {model_id}")
def train_candidate(plan, dataset: str, base_path: str, model_id: str, rnd: int, init: Path | None) -> dict:
    """The candidate through the train stage's own entry point (`train_job`), on a Parquet snapshot of
    the live train split: the same files, grids and checkpoints whatever train.processes is."""
    from pd_data.incremental import snapshot_split
    from pd_model.train import ModelSpec
    from pd_model.train_dist import TrainJob

    out = live_dir(plan, dataset) / "candidates" / model_id
    cfg = plan.profile.train
    if not (out / "losses.json").exists():  # else finished in an earlier, interrupted run
        snapshot = out / "train-split"
        snapshot_split(live_dir(plan, dataset), plan.state.db, dataset, "train", snapshot)
        job = TrainJob(base=base_path, images=str(snapshot), annotations=str(snapshot), cfg=cfg,
                       spec=ModelSpec(model_id, "prompt-diffusion", TRAINING_TASKS, cfg.steps, rnd), out=str(out),
                       init=None if init is None else str(init), pairing=plan.profile.data.pairing,
                       validation_guidance=plan.profile.eval.guidance_scale)
        train_job(job, lambda path, step: publish_grid(path, step, f"{dataset}-{model_id}"))
        shutil.rmtree(snapshot)  # a copy of the whole train split: the live tables keep the data
    losses = json.loads((out / "losses.json").read_text())["loss"]
    return {"path": str(out), "steps": len(losses), "final_loss": losses[-1]}


@task(cache_policy=NO_CACHE, name="benchmark-model", task_run_name="evaluate {model_id}")
def evaluate_model(plan, dataset: str, base_path: str, model_dir: Path, model_id: str, bench: Path) -> str:
    """Scores of one registry model on the frozen benchmark under the profile's evaluation settings,
    computed once per (model, settings, prompts)."""
    from pd_eval.evaluate import Split, evaluate_folders, store
    from pd_eval.registry import evaluated, retrain_eval_id

    eval_id, key = retrain_eval_id(dataset, model_id, plan.profile.eval, bench / "prompts.parquet")
    if not evaluated(plan.state.db, eval_id):
        where = Split(bench, bench, read_done(bench)["split"], bench / "prompts.parquet", plan.profile.data.pairing,
                      baselines=False)
        result = evaluate_folders(base_path, {model_id: model_dir}, (), where, plan.profile.eval,
                                  live_dir(plan, dataset) / "eval" / model_id / key, task_inference=False,
                                  cache=features_cache(plan))
        store(plan.state.db, eval_id, [], result)
    return eval_id


@flow(name="retrain", log_prints=True)
def retrain_flow(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
                 dataset: str = "default", from_scratch: bool = False) -> dict:
    """One retraining round of `dataset`: new data in, a candidate trained and benchmarked against the
    current model, promoted only if the rule says so (`pd models` lists the decisions).

    Args:
        profile: Configuration profile: smoke (minutes: trials and tests), demo (CPU-sized) or paper (Stable Diffusion 1.5, GPU).
        overrides: Values over the profile's, by section, e.g. {"train": {"steps": 50}} or
            {"eval": {"guidance_scale": 1.5}}; `pd profile NAME` prints every key. Unknown keys are errors.
        state_dir: Folder of data, models, results and reports (default: $PD_STATE_DIR, else .pd).
        dataset: Name of the live dataset (a folder under <state>/data/live); each has its own models.
        from_scratch: Train the candidate from the base, not continued from the current model.
    """
    plan = make_plan(profile, overrides, state_dir)
    if (t := plan.profile.train).replicates > 1 or t.baseline_replicates > 1:
        from flows.profiles import ConfigError

        raise ConfigError(f"train.replicates={t.replicates} / train.baseline_replicates={t.baseline_replicates}: a "
                          f"retraining round trains one candidate; replicate with the full benchmark "
                          f"(`pd run --profile {plan.profile.name}`), or set both to 1 here")
    log = get_run_logger()
    # One round of a dataset at a time: a scheduled and a triggered round wait for each other.
    with stage_lock(live_dir(plan, dataset), on_wait=lambda: log.info("another round of %s is running; waiting", dataset)):
        return _round(plan, dataset, from_scratch)


def _round(plan, dataset: str, from_scratch: bool) -> dict:
    from pd_eval import registry
    from pd_eval.store import init_db

    log, db = get_run_logger(), plan.state.db
    init_db(db)
    live = live_dir(plan, dataset)
    data = ingest_round(plan, dataset)
    log.info("data round %d: %s", data["round"], data)
    bench = frozen_benchmark(plan, dataset)
    base_path = base_for(plan, dataset)
    cur = registry.current(db, dataset)
    model_id = f"r{data['round']:04d}"
    init = None if from_scratch or cur is None else Path(cur["path"]) / "controlnet"
    cand = train_candidate(plan, dataset, base_path, model_id, data["round"], init)
    cand_eval = evaluate_model(plan, dataset, base_path, Path(cand["path"]), model_id, bench)
    cand_scores = registry.scores(db, cand_eval)
    cur_scores = None
    if cur is not None:
        cur_scores = registry.scores(db, evaluate_model(plan, dataset, base_path, Path(cur["path"]), cur["model_id"], bench))
    promote, reason = registry.decide(cand_scores, cur_scores)
    parent = None if init is None else cur["model_id"]
    registry.record(db, {"dataset": dataset, "model_id": model_id, "data_round": data["round"],
                         "created_at": datetime.now(timezone.utc), "parent_id": parent, "path": cand["path"],
                         "eval_id": cand_eval,
                         "train_steps": cand["steps"], "from_scratch": init is None, "final_loss": cand["final_loss"]},
                    promote, reason)
    now_current = registry.current(db, dataset)["model_id"]
    md = registry.round_report(dataset, model_id, data, cand, parent, cur and cur["model_id"], cand_scores, cur_scores,
                               promote, reason, now_current)
    path = plan.state.reports / "retrain" / dataset / f"{model_id}.md"
    atomic_write_bytes(path, md.encode())
    key = re.sub(r"[^a-z0-9-]", "-", f"retrain-{dataset}".lower())
    create_markdown_artifact(key=key, markdown=md, description=f"Retraining round {data['round']} of {dataset}")
    create_table_artifact(key=f"{key}-metrics", description=f"Candidate {model_id} vs the current model",
                          table=[{"task": t, "metric": m, "candidate": s.value,
                                  "current": cur_scores[(t, m)].value if cur_scores and (t, m) in cur_scores else None}
                                 for (t, m), s in sorted(cand_scores.items())])
    log.info("%s: %s (%s); current model: %s; report %s", model_id, "promoted" if promote else "rejected", reason,
             now_current, path)
    return {"dataset": dataset, "model_id": model_id, "decision": "promoted" if promote else "rejected",
            "reason": reason, "current": now_current, "data": data, "report": str(path), "live_dir": str(live)}


SOURCE_CHANGED = "pd.source.changed"


@flow(name="watch-source", log_prints=True)
def watch_source_flow(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
                      dataset: str = "default") -> dict:
    """Emit a `pd.source.changed` event when the source's fingerprint moved since the last look.

    The retrain deployment's event trigger (prefect.yaml) turns that event into a retraining run,
    so new data is picked up between the weekly scheduled runs.

    Args:
        profile: Configuration profile: smoke (minutes: trials and tests), demo (CPU-sized) or paper (Stable Diffusion 1.5, GPU).
        overrides: Values over the profile's, by section, e.g. {"train": {"steps": 50}} or
            {"eval": {"guidance_scale": 1.5}}; `pd profile NAME` prints every key. Unknown keys are errors.
        state_dir: Folder of data, models, results and reports (default: $PD_STATE_DIR, else .pd).
        dataset: Name of the live dataset whose source is watched (the event names it).
    """
    from prefect.events import emit_event

    plan = make_plan(profile, overrides, state_dir, trains=False)
    marker = live_dir(plan, dataset) / "watch.json"
    now = plan.source_fingerprint  # taken once, when the plan was built
    last = json.loads(marker.read_text())["fingerprint"] if marker.exists() else None
    changed = now != last
    if changed:
        emit_event(event=SOURCE_CHANGED, resource={"prefect.resource.id": f"pd.dataset.{dataset}"},
                   payload={"fingerprint": now, "previous": last, "profile": profile})
        atomic_write_json(marker, {"fingerprint": now, "seen_at": datetime.now(timezone.utc).isoformat()})
    get_run_logger().info("source of %s: %s (fingerprint %s)", dataset, "changed" if changed else "unchanged", now)
    return {"dataset": dataset, "changed": changed, "fingerprint": now, "previous": last}
