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

import copy
import hashlib
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.stages import Overrides, make_plan
from pd_data.state import atomic_write_bytes, atomic_write_json, fingerprint, is_done, mark_done, read_done
from pd_data.tasks import TRAINING_TASKS


def live_dir(plan, dataset: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset):
        raise ValueError(f"dataset name {dataset!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
    return plan.state.data / "live" / dataset


def _pending_round(db: Path, dataset: str) -> int | None:
    """The latest committed data round if no candidate was recorded for it (its run crashed)."""
    from pd_data.incremental import ensure_schema as data_schema
    from pd_eval.registry import ensure_schema as reg_schema
    from pd_eval.store import connect

    with connect(db) as con:
        data_schema(con)
        reg_schema(con)
        row = con.execute("""SELECT d.round FROM data_rounds d LEFT JOIN registry r
                             ON r.dataset = d.dataset AND r.data_round = d.round
                             WHERE d.dataset = ? AND r.model_id IS NULL ORDER BY d.round DESC LIMIT 1""",
                          [dataset]).fetchone()
        last = con.execute("SELECT max(round) FROM data_rounds WHERE dataset = ?", [dataset]).fetchone()[0]
    return row[0] if row and row[0] == last else None


@task(cache_policy=NO_CACHE, name="incremental-ingest")
def ingest_round(plan, dataset: str) -> dict:
    from pd_data.incremental import update_live
    from pd_eval.store import connect

    db = plan.state.db
    if (rnd := _pending_round(db, dataset)) is not None:
        get_run_logger().info("round %d of %s committed its data but recorded no candidate: resuming it", rnd, dataset)
        with connect(db, read_only=True) as con:
            cur = con.execute("SELECT * FROM data_rounds WHERE dataset = ? AND round = ?", [dataset, rnd])
            row = dict(zip([d[0] for d in cur.description], cur.fetchone()))
        return {k: v for k, v in row.items() if k not in ("created_at", "config_hash")} | {"resumed": True}
    return update_live(plan.profile.data, live_dir(plan, dataset), db, dataset) | {"resumed": False}


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


@task(cache_policy=NO_CACHE, name="retrain-base")
def base_for(plan, dataset: str):
    """The tiny base, trained once per live dataset on its first round's train split; SD 1.5 is loaded."""
    from pd_data.incremental import load_live_split
    from pd_model.base import build_tiny_base, load_base
    from pd_model.train import save_losses, train_base

    cfg = plan.profile.base
    if cfg.kind != "tiny":
        return load_base(cfg.pretrained_path).freeze(), cfg.pretrained_path
    out = live_dir(plan, dataset) / "base"
    if not is_done(out):
        data = load_live_split(live_dir(plan, dataset), plan.state.db, dataset, "train")
        base = build_tiny_base(cfg, sorted(set(data.captions.values())), plan.profile.data.resolution)
        losses = train_base(base, data, cfg)
        base.save(out)
        save_losses(out / "losses.json", losses)
        mark_done(out, {"steps": cfg.train_steps, "final_loss": losses[-1] if losses else None})
    return load_base(out).freeze(), str(out)


@task(cache_policy=NO_CACHE, name="train-candidate")
def train_candidate(plan, dataset: str, base, base_path: str, model_id: str, rnd: int, init: Path | None) -> dict:
    from pd_data.incremental import load_live_split
    from pd_model.pipeline import load_trained, save_trained
    from pd_model.train import save_losses, train_controlnet

    out = live_dir(plan, dataset) / "candidates" / model_id
    cfg = plan.profile.train
    if (out / "losses.json").exists():  # finished in an earlier, interrupted run
        pass
    elif cfg.processes > 1:
        # torchrun workers (see pd_model.train_dist) read a Parquet snapshot of the live train split,
        # never the database; the main worker writes the candidate folder, losses.json last.
        from pd_data.incremental import snapshot_split
        from pd_model.train_dist import TrainJob, launch

        snapshot = out / "train-split"
        snapshot_split(live_dir(plan, dataset), plan.state.db, dataset, "train", snapshot)
        launch(TrainJob(base=str(base_path), images=str(snapshot), annotations=str(snapshot), cfg=cfg,
                        mode="prompt_diffusion", tasks=TRAINING_TASKS, steps=cfg.steps, seed_offset=rnd, out=str(out),
                        init=None if init is None else str(init), pairing=plan.profile.data.pairing))
        shutil.rmtree(snapshot)  # a copy of the whole train split: the live tables keep the data
    else:
        data = load_live_split(live_dir(plan, dataset), plan.state.db, dataset, "train", plan.profile.data.pairing)
        if cfg.train_unet_decoder:  # trained in place: on a copy (the current model's own UNet when it has one),
            own = load_trained(init.parent)[2] if init is not None else None  # never on the shared base
            base = base.with_unet(own if own is not None else copy.deepcopy(base.unet))
        net, losses = train_controlnet(base, data, TRAINING_TASKS, cfg, "prompt_diffusion", cfg.steps, seed_offset=rnd,
                                       checkpoint_dir=out / "checkpoints", init=init)
        save_trained(out, net, base, base_path, "prompt_diffusion", TRAINING_TASKS, cfg.train_unet_decoder)
        save_losses(out / "losses.json", losses)  # last: marks the candidate complete
    losses = json.loads((out / "losses.json").read_text())["loss"]
    return {"path": str(out), "steps": len(losses), "final_loss": losses[-1]}


@task(cache_policy=NO_CACHE, name="benchmark-model")
def evaluate_model(plan, dataset: str, base, model_dir: Path, model_id: str, bench: Path) -> str:
    """Scores of one registry model on the frozen benchmark under the profile's evaluation settings."""
    from pd_data.dataset import load_split
    from pd_eval.benchmark import ModelUnderTest, run_benchmark
    from pd_eval.store import query, write_rows
    from pd_model.pipeline import load_trained

    prompts_hash = hashlib.sha256((bench / "prompts.parquet").read_bytes()).hexdigest()
    eval_key = fingerprint("retrain-eval", plan.profile.eval.model_dump(), prompts_hash)
    eval_id = f"retrain:{dataset}:{model_id}:{eval_key}"
    _, done = query(plan.state.db, "SELECT count(*) FROM metrics WHERE eval_id = ?", [eval_id])
    if done[0][0]:
        return eval_id
    _, net, unet = load_trained(model_dir)
    data = load_split(bench, bench, read_done(bench)["split"], plan.profile.data.pairing)
    metrics, _ = run_benchmark(base, [ModelUnderTest("prompt-diffusion", model_id, net, TRAINING_TASKS, unet=unet)], data,
                               bench / "prompts.parquet", plan.profile.eval, live_dir(plan, dataset) / "eval" / model_id / eval_key)
    now = datetime.now(timezone.utc)
    write_rows(plan.state.db, "metrics", [{"eval_id": eval_id, "created_at": now, **{k: v for k, v in r.items() if k != "seconds"}}
                                          for r in metrics])
    return eval_id


def _report(dataset: str, model_id: str, data: dict, cand: dict, parent: str | None, current_id: str | None,
            cand_scores, cur_scores, promoted: bool, reason: str, now_current: str) -> str:
    from pd_eval.registry import RULE

    lines = [f"# Retraining of `{dataset}`: candidate `{model_id}`", "",
             f"**Decision: {'PROMOTED' if promoted else 'REJECTED'}.** {reason}. Current model now: `{now_current}`.", "",
             f"Rule: {RULE}.", "", "## Data",
             f"Round {data['round']}{' (resumed)' if data.get('resumed') else ''}: {data['listed']} items listed; "
             f"{data['added']} added, {data['changed']} changed, {data['deleted']} deleted, {data['rejected']} rejected, "
             f"{data['unchanged']} unchanged. Annotated this round: {data['annotated']} (only new or changed items).", "",
             "## Candidate",
             f"{'From scratch' if parent is None else f'Continued from `{parent}`'}; "
             f"{cand['steps']} steps, final loss {cand['final_loss']:.4f}.", "", "## Metrics (same benchmark, same prompts and seeds)",
             f"| task | metric | current{f' ({current_id})' if current_id else ''} | candidate | change |", "|---|---|---|---|---|"]
    for (t, m), s in sorted(cand_scores.items()):
        c = (cur_scores or {}).get((t, m))
        cur_txt = f"{c.value:.4f} [{c.ci_low:.4f}, {c.ci_high:.4f}]" if c else "-"
        change = f"{(s.value - c.value) / max(abs(c.value), 1e-12):+.1%}" if c else "-"
        lines.append(f"| {t} | {m} | {cur_txt} | {s.value:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}] | {change} |")
    return "\n".join(lines) + "\n"


@flow(name="retrain", log_prints=True)
def retrain_flow(profile: str = "smoke", overrides: Overrides = None, state_dir: str | None = None,
                 dataset: str = "default", from_scratch: bool = False) -> dict:
    """One retraining round of `dataset` on the profile's source (see the module docstring)."""
    from pd_eval import registry
    from pd_eval.store import init_db
    from pd_model.train_dist import check_devices

    plan = make_plan(profile, overrides, state_dir)
    check_devices(plan.profile.train)  # before any ingest or training, as the train stage does
    log, db = get_run_logger(), plan.state.db
    init_db(db)
    live = live_dir(plan, dataset)
    data = ingest_round(plan, dataset)
    log.info("data round %d: %s", data["round"], data)
    bench = frozen_benchmark(plan, dataset)
    base, base_path = base_for(plan, dataset)
    cur = registry.current(db, dataset)
    model_id = f"r{data['round']:04d}"
    init = None if from_scratch or cur is None else Path(cur["path"]) / "controlnet"
    cand = train_candidate(plan, dataset, base, base_path, model_id, data["round"], init)
    cand_eval = evaluate_model(plan, dataset, base, Path(cand["path"]), model_id, bench)
    cand_scores = registry.scores(db, cand_eval)
    cur_scores = None
    if cur is not None:
        cur_eval = evaluate_model(plan, dataset, base, Path(cur["path"]), cur["model_id"], bench)
        cur_scores = registry.scores(db, cur_eval)
    promote, reason = registry.decide(cand_scores, cur_scores)
    registry.record(db, {"dataset": dataset, "model_id": model_id, "data_round": data["round"],
                         "created_at": datetime.now(timezone.utc), "parent_id": None if init is None else cur["model_id"],
                         "path": cand["path"], "eval_id": cand_eval, "train_steps": cand["steps"],
                         "from_scratch": init is None, "final_loss": cand["final_loss"]}, promote, reason)
    now_current = registry.current(db, dataset)["model_id"]
    md = _report(dataset, model_id, data, cand, None if init is None else cur["model_id"], cur and cur["model_id"],
                 cand_scores, cur_scores, promote, reason, now_current)
    path = plan.state.reports / "retrain" / dataset / f"{model_id}.md"
    atomic_write_bytes(path, md.encode())
    key = re.sub(r"[^a-z0-9-]", "-", f"retrain-{dataset}".lower())
    create_markdown_artifact(key=key, markdown=md, description=f"Retraining round {data['round']} of {dataset}")
    create_table_artifact(key=f"{key}-metrics", description=f"Candidate {model_id} vs the current model",
                          table=[{"task": t, "metric": m, "candidate": s.value,
                                  "current": (cur_scores or {}).get((t, m)).value if cur_scores and (t, m) in cur_scores else None}
                                 for (t, m), s in sorted(cand_scores.items())])
    log.info("%s: %s (%s); current model: %s; report %s", model_id, "promoted" if promote else "rejected", reason,
             now_current, path)
    return {"dataset": dataset, "model_id": model_id, "decision": "promoted" if promote else "rejected",
            "reason": reason, "current": now_current, "data": data, "report": str(path), "live_dir": str(live)}


SOURCE_CHANGED = "pd.source.changed"


@flow(name="watch-source", log_prints=True)
def watch_source_flow(profile: str = "demo", overrides: Overrides = None, state_dir: str | None = None,
                      dataset: str = "default") -> dict:
    """Emit a `pd.source.changed` event when the source's fingerprint moved since the last look.

    The retrain deployment's event trigger (prefect.yaml) turns that event into a retraining run,
    so new data is picked up between the weekly scheduled runs.
    """
    from prefect.events import emit_event

    from pd_data.sources import make_source

    plan = make_plan(profile, overrides, state_dir)
    marker = live_dir(plan, dataset) / "watch.json"
    now = make_source(plan.profile.data).fingerprint()
    last = json.loads(marker.read_text())["fingerprint"] if marker.exists() else None
    changed = now != last
    if changed:
        emit_event(event=SOURCE_CHANGED, resource={"prefect.resource.id": f"pd.dataset.{dataset}"},
                   payload={"fingerprint": now, "previous": last, "profile": profile})
        atomic_write_json(marker, {"fingerprint": now, "seen_at": datetime.now(timezone.utc).isoformat()})
    get_run_logger().info("source of %s: %s (fingerprint %s)", dataset, "changed" if changed else "unchanged", now)
    return {"dataset": dataset, "changed": changed, "fingerprint": now, "previous": last}
