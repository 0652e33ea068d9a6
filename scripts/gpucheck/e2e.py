"""A short paper-profile run end to end, without Prefect, on inputs made on the spot.

The `paper` profile with overrides that point it at a small InstructPix2Pix folder (seeds.json, prompt
folders, 256 px JPEG twins), a `data.annotator_weights` folder of tiny random networks in the released
layouts and a tiny random base in Stable Diffusion's diffusers layout (latent UNet, 8x VAE, CLIP text
encoder, scheduler), and that shrink its sizes (a few prompts, a few training steps). The
preflight (`pd check`) passes on them; then each stage runs as its flow runs it, by the same calls in
the DAG's order (`flows.stages`), without Prefect's tasks: ingest shards, annotate shards, prompts,
every model of the plan trained (`pd_model.train_dist.run_job`), the benchmark scored and stored in
DuckDB. The report stage, DuckDB to Markdown on the CPU, is left to the test suite.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from gpucheck.record import log

GROUPS = {"tiny": 4, "full": 10}  # prompt folders of 2 seeds: 16 or 40 images, 2 layouts per group
# The paper's annotators, but for BAE normals (a 70M-parameter network: the unseen normal task waits for
# it); tiny, without the HED scribble either (HED's VGG again, seconds an image on a small CPU).
ANNOTATORS = {"depth": "transformers", "hed": "controlnet_aux", "seg": "transformers", "canny": "controlnet_aux",
              "scribble": "controlnet_aux"}
TINY_ANNOTATORS = {k: v for k, v in ANNOTATORS.items() if k != "scribble"}
MIN_SECONDS = {"tiny": 8.0, "full": 40.0}


def write_ip2p(root: Path, side: int, groups: int, seed: int = 0) -> Path:
    """An InstructPix2Pix folder: seeds.json and `groups` prompt folders of 2 twin pairs of shapes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    listing = []
    for g in range(groups):
        d = root / f"{g:07d}"
        d.mkdir(parents=True)
        (d / "prompt.json").write_text(json.dumps({"input": "a photo of a red ball", "edit": "make it blue",
                                                   "output": "a photo of a blue ball on a table"}))
        seeds = [int(s) for s in rng.integers(10**6, size=2)]
        for s in seeds:
            img = np.full((side, side, 3), rng.integers(0, 256, 3), np.uint8)
            a, b = sorted(rng.integers(0, side, 2))
            img[a:b + 8, a:b + 8] = rng.integers(0, 256, 3)  # a square: edges, depth and segments to find
            for k in (0, 1):
                Image.fromarray(img if k == 0 else 255 - img).save(d / f"{s}_{k}.jpg", quality=95)
        listing.append([f"{g:07d}", seeds])
    (root / "seeds.json").write_text(json.dumps(listing))
    return root


def make_inputs(root: Path, side: int, tiny: bool) -> dict[str, Path]:
    """Every input the paper profile reads, in the layouts `pd check` expects."""
    from gpucheck import annotators, models

    inputs = {"ip2p": write_ip2p(root / "instructpix2pix", side, GROUPS["tiny" if tiny else "full"]),
              "annotators": annotators.write_weights(root / "annotators", tiny=True)}
    models.build_base(models.TINY, "cpu").save(root / "stable-diffusion-v1-5")
    inputs["sd15"] = root / "stable-diffusion-v1-5"
    return inputs


def overrides(inputs: dict[str, Path], side: int, device: torch.device, tiny: bool) -> dict:
    """The paper profile pointed at `inputs` and shrunk. Its sampler is the paper's (DDIM 100, text
    guidance 9; tiny: 2 steps, for a 2-core CPU) under `eval.protocol=fast`, whose FID reads the offline
    128-d features: the protocol's Inception FID takes a 2048 x 2048 matrix square root per value and per
    bootstrap resample, a minute each on a small CPU (`evaluation.fid` times one)."""
    dev = "cuda" if device.type == "cuda" else "cpu"
    ev = {"protocol": "fast", "steps": 2 if tiny else 100, "guidance_scale": 9.0, "bootstrap": 2, "unseen_per_task": 2,
          "task_inference_queries": 1 if tiny else 2, "sensitivity_per_task": 0, "kid_subsets": 2, "kid_subset_size": 2,
          "device": dev}
    return {"data": {"source_path": str(inputs["ip2p"]), "annotator_weights": str(inputs["annotators"]),
                     "annotators": TINY_ANNOTATORS if tiny else ANNOTATORS, "resolution": side, "shard_size": 16,
                     "split_fractions": [0.5, 0.0, 0.5]},
            "prompts": {"per_task": 2},  # FID of one image each raises in scipy's sqrtm
            "base": {"pretrained_path": str(inputs["sd15"])},
            "train": {"steps": 2, "batch_size": 2, "baseline_steps_per_task": 1, "loader_workers": 0,
                      "checkpoint_every": 0, "report_to": "none", "device": dev},
            "eval": ev}


@contextmanager
def environment(**values: str):
    """Environment variables set for the block, then as they were."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def stage_ingest(plan) -> dict:
    from pd_data.ingest import count_shards, ingest_shard, listing, prepare, summarise
    from pd_data.sources import make_source

    cfg, out, t0 = plan.profile.data, plan.dir("ingest"), time.perf_counter()
    source = make_source(cfg)
    prepare(out)
    listed = listing(source)
    done = [ingest_shard(cfg, s, out, listed) for s in range(count_shards(cfg, listed))]
    summary = summarise(out, source.name, len(listed[0]), sum(d["resumed"] for d in done), time.perf_counter() - t0)
    return {"rows_in": summary["rows_in"], "rows_out": summary["rows_out"], "shards": len(done)}


def stage_annotate(plan) -> dict:
    from pd_data.annotate import annotate_shard
    from pd_data.dataset import load_split
    from pd_data.prompts import materialise_prompts
    from pd_data.shards import write_lineage

    cfg, out = plan.profile.data, plan.dir("annotate")
    shards = sorted(plan.dir("ingest").glob("images-*.parquet"))
    rows = [annotate_shard(s, out / s.name.replace("images-", "annotations-"), cfg.annotators, Path(cfg.annotator_weights))
            for s in shards]
    write_lineage(out, plan.key("annotate"), plan.key("ingest"), cfg.annotators)
    data = load_split(plan.dir("ingest"), out, plan.profile.prompts.split, cfg.pairing)
    n = materialise_prompts(data, plan.eval_tasks, plan.profile.prompts, plan.dir("prompts") / "prompts.parquet")
    return {"rows": sum(r["rows"] for r in rows), "rejects": sum(r["rejects"] for r in rows), "prompts": n}


def stage_train(plan) -> dict:
    from pd_model.train_dist import TrainJob, run_job

    models = []
    for spec in plan.models:
        out = plan.dir("train") / spec.name
        job = TrainJob(base=plan.profile.base.pretrained_path, images=str(plan.dir("ingest")),
                       annotations=str(plan.dir("annotate")), cfg=plan.profile.train, spec=spec, out=str(out),
                       validation_guidance=plan.profile.eval.guidance_scale, pairing=plan.profile.data.pairing)
        losses = run_job(job)
        models.append({"name": spec.name, "kind": spec.kind, "tasks": list(spec.tasks), "path": str(out),
                       "steps": spec.steps, "final_loss": losses[-1], "replicate": spec.replicate})
    plan.dir("train").joinpath("models.json").write_text(json.dumps(models))
    return {"models": len(models), "finite_losses": all(np.isfinite(m["final_loss"]) for m in models)}


def stage_evaluate(plan, cache: Path) -> dict:
    from pd_eval.evaluate import Split, evaluate_replicates, store
    from pd_eval.schema import ModelRow
    from pd_eval.store import query

    models = json.loads(plan.dir("train").joinpath("models.json").read_text())
    data = plan.profile.data
    where = Split(plan.dir("ingest"), plan.dir("annotate"), plan.profile.prompts.split,
                  plan.dir("prompts") / "prompts.parquet", data.pairing, annotators=data.annotators,
                  annotator_weights=data.annotator_weights)
    result, _ = evaluate_replicates(plan.profile.base.pretrained_path, models, plan.unseen_tasks, where, plan.profile.eval,
                                    plan.dir("evaluate"), cache=cache)
    rows = [ModelRow(model_id=m["name"], eval_id="", kind=m["kind"], tasks=m["tasks"], path=m["path"],
                     train_steps=m["steps"], final_loss=m["final_loss"]) for m in models]
    n = store(plan.state.db, plan.key("evaluate"), rows, result)
    _, counted = query(plan.state.db, "SELECT count(*), count(DISTINCT metric), list(DISTINCT feature_extractor) FROM metrics")
    return {"samples": result.total, "metric_rows_stored": n, "metric_rows_in_duckdb": counted[0][0],
            "metrics": counted[0][1], "feature_extractors": sorted(counted[0][2])}


def run(tiny: bool, device: torch.device, budget, record) -> dict | None:
    """The run's stages, timed; None (and a not_measured entry) when too little time is left to start it."""
    from flows.plan import Plan
    from flows.preflight import require_inputs
    from flows.profiles import load_profile
    from pd_core.state import StateDir

    mode = "tiny" if tiny else "full"
    if budget.left() < MIN_SECONDS[mode]:
        record.skip("e2e", f"{budget.left():.0f} s left; a run needs about {MIN_SECONDS[mode]:.0f} s")
        return None
    side = 64 if tiny else 256
    with tempfile.TemporaryDirectory(prefix="pd-gpu-check-e2e-") as tmp:
        root, stages, t0 = Path(tmp), {}, time.perf_counter()
        inputs = make_inputs(root / "inputs", side, tiny)
        over = overrides(inputs, side, device, tiny)
        stages["inputs"] = {"seconds": round(time.perf_counter() - t0, 2)}
        with environment(PD_STATE_DIR=str(root / "state")):
            profile = load_profile("paper", over)
            require_inputs(profile)  # `pd check --profile paper` on these inputs
            plan = Plan.build(profile, StateDir.resolve(root / "state"))
            steps = (("ingest", stage_ingest), ("annotate", stage_annotate), ("train", stage_train),
                     ("evaluate", lambda p: stage_evaluate(p, root / "cache")))
            for name, fn in steps:
                log(f"e2e: {name}")
                t = time.perf_counter()
                stages[name] = fn(plan) | {"seconds": round(time.perf_counter() - t, 2)}
    return {"profile": "paper", "device": str(device), "resolution": side, "protocol": profile.eval.protocol,
            "ddim_steps": profile.eval.steps, "annotators": profile.data.annotators, "stages": stages,
            "seconds": round(time.perf_counter() - t0, 2), "overrides": over,
            "not_run": "report stage (DuckDB to Markdown/HTML on the CPU: the test suite runs it)"}
