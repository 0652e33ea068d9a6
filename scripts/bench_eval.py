"""Evaluation cost and the fast-sampler question.

    .venv/bin/python scripts/bench_eval.py throughput                       # samples/s, 1 and 2 CPU processes
    .venv/bin/python scripts/bench_eval.py throughput --paper-size --device cuda   # per-GPU rate, paper cost
    .venv/bin/python scripts/bench_eval.py samplers --state DIR             # the sampler study on a demo run

`throughput`: generation through the evaluate stage's own path (`pd_eval.generation.run_generation`)
on a demo-shaped Prompt Diffusion model at random initialisation (a tiny world is built in a temporary
folder), at DDIM 20 with text guidance 3 on every task, on the CPU, for each of --configs (processes x
threads each: 1x1, 2x1 and 1x2 by default); each is timed --repeats times, alternating, and the median
is printed. With --paper-size it times one
denoising step of an SD-1.5-sized UNet + Prompt Diffusion ControlNet at random initialisation (as
`scripts/bench_train.py --paper-size` builds them; 256 px, bf16 autocast) with the two guidance
branches of the paper's protocol, and projects the wall time of the paper profile's whole evaluation
(every sample of its work list x 100 DDIM steps) on 1 and 8 such devices. Model loading, the text
encoder, the VAE decode and the metrics are left out, and every sample is timed with the Prompt
Diffusion ControlNet (a CN(FT) sample is a little cheaper): the projection is approximate.

`samplers`: the trained Prompt Diffusion model of a demo run's state directory (`make benchmark`, or
`pd run --profile demo`), on its six trained tasks, with --per-task prompts per task drawn from the
test split: the paper's sampler (DDIM 100 steps, text guidance 9) against DDIM 20 and DPM-Solver++
and UniPC at 10 and 20 steps at the same guidance; FID/KID (map->image) and RMSE (image->map) with
their bootstrap 95% intervals, and samples/s. A setting "holds" on a task when its value of the
task's Table 1 metric (FID or RMSE; KID is printed, not judged) lies inside the interval of DDIM 100
there; the fastest setting that holds on every task is printed last (none, when none does).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import device_sync, emit, interleave, machine, median, schedule, stopwatch

SAMPLERS = [("ddim", 100), ("ddim", 20), ("dpm", 20), ("unipc", 20), ("dpm", 10), ("unipc", 10)]


def tiny_world(root: Path, n_groups: int = 8) -> dict:
    """A procedural dataset (all test split), a tiny base and a random Prompt Diffusion model folder."""
    from pd_data.annotate import annotate_shard
    from pd_data.config import DataConfig, PromptConfig
    from pd_data.dataset import load_split
    from pd_data.ingest import ingest
    from pd_data.prompts import materialise_prompts
    from pd_data.tasks import TRAINING_TASKS
    from pd_model.base import build_tiny_base, load_base
    from flows.profiles import load_profile
    from pd_model.pipeline import save_trained
    from pd_model.train import build_controlnet

    cfg = DataConfig(n_groups=n_groups, split_fractions=(0.0, 0.0, 1.0))
    ingest(cfg, root / "img")
    for p in sorted((root / "img").glob("images-*.parquet")):
        annotate_shard(p, root / "ann" / p.name.replace("images", "annotations"), cfg.annotators)
    data = load_split(root / "img", root / "ann", "test")
    demo = load_profile("demo")  # the demo's base, at random initialisation
    build_tiny_base(demo.base, sorted(set(data.captions.values())), demo.data.resolution).save(root / "base")
    base = load_base(root / "base")
    save_trained(root / "pd", build_controlnet(base, "prompt-diffusion"), base, str(root / "base"), "prompt-diffusion",
                 TRAINING_TASKS, False)
    materialise_prompts(data, TRAINING_TASKS, PromptConfig(per_task=8), root / "prompts.parquet")
    return {"base": root / "base", "pd": root / "pd", "images": root / "img", "annotations": root / "ann",
            "prompts": root / "prompts.parquet", "split": "test"}


def job_for(w: dict, cfg, out: Path):
    from pd_eval.benchmark import evaluation_prompts, models_under_test, requests
    from pd_eval.evaluate import read_meta
    from pd_eval.generation import GenerationJob

    meta = read_meta(w["pd"])
    reqs = requests(models_under_test({"prompt-diffusion": (meta["kind"], tuple(meta["tasks"]))}, ()),
                    evaluation_prompts(w["prompts"], cfg), cfg)
    return GenerationJob(base=str(w["base"]), models={"prompt-diffusion": str(w["pd"])}, images=str(w["images"]),
                         annotations=str(w["annotations"]), split=w["split"], cfg=cfg, out=str(out), requests=reqs)


def throughput_cpu(args) -> dict:
    from pd_eval.config import EvalConfig
    from pd_eval.generation import run_generation

    if args.device != "cpu":
        raise SystemExit("throughput without --paper-size times the CPU; pass --paper-size for a GPU")
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]  # (processes, threads)
    with tempfile.TemporaryDirectory() as tmp:
        w = tiny_world(Path(tmp) / "world")
        times: dict[str, list[float]] = {f"{p}x{t}": [] for p, t in configs}
        n = 0
        for rep, (p, t) in schedule(configs, args.repeats):
            cfg = EvalConfig(steps=20, guidance_scale=3.0, batch_size=args.batch, threads=t, device="cpu")
            job = job_for(w, cfg, Path(tmp) / f"out-{p}x{t}-{rep}")  # a fresh folder: nothing is resumed
            with stopwatch() as lap:
                n = run_generation(job, p)
            times[f"{p}x{t}"].append(lap.seconds)
        rates = {c: n / median(t) for c, t in times.items()}
        first = next(iter(rates))
        return {"device": "cpu", "samples": n, "sampler": "ddim 20 steps, guidance 3", "batch": args.batch,
                "configs": "processes x threads each", "seconds": {c: [round(x, 2) for x in t] for c, t in times.items()},
                "samples_per_s_median": {c: round(r, 2) for c, r in rates.items()},
                f"speedup_vs_{first}": {c: round(r / rates[first], 2) for c, r in rates.items()},
                "note": "wall time includes each run's start: torchrun and model loading for more than one process"}


def paper_samples(per_task: int | None = None) -> dict:
    """The paper profile's evaluation work list (at `per_task` prompts per task if given): samples per
    kind of request."""
    from flows.profiles import load_profile
    from pd_data.tasks import TRAINING_TASKS, UNSEEN_TASKS

    p = load_profile("paper")
    n, trained, unseen = per_task or p.prompts.per_task, len(TRAINING_TASKS), len(UNSEEN_TASKS)
    u = min(p.eval.unseen_per_task, n)
    counts = {"prompt-diffusion, trained tasks": n * trained, "cn-ft, trained tasks": n * trained,
              "unseen tasks, 4 conditions": 4 * u * unseen, "task inference": 3 * min(p.eval.task_inference_queries, n)}
    return {"per_task": n, "steps": p.eval.steps, "counts": counts, "total": sum(counts.values())}


def throughput_paper(args) -> dict:
    """One guided denoising step (2 branches) of the SD-1.5-sized model at random init; the projection."""
    from diffusers import UNet2DConditionModel

    from pd_model.controlnet import PromptDiffusionControlNet

    dev, res, b = args.device, 256, args.batch
    unet = UNet2DConditionModel(sample_size=res // 8, cross_attention_dim=768).to(dev).eval()
    net = PromptDiffusionControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * b, 4, res // 8, res // 8, generator=g).to(dev)
    emb = torch.randn(2 * b, 77, 768, generator=g).to(dev)
    pair, query = torch.randn(2 * b, 6, res, res, generator=g).to(dev), torch.randn(2 * b, 3, res, res, generator=g).to(dev)
    t = torch.tensor(500, device=dev)

    @torch.no_grad()
    def step() -> None:
        with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=not args.fp32):
            down, mid = net(x, t, emb, controlnet_cond=pair, controlnet_query_cond=query, return_dict=False)
            unet(x, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    step_s = median(interleave({"step": step}, args.repeats, warmup=2, sync=device_sync(dev))["step"])
    work, full = paper_samples(), paper_samples(10_000)  # the profile's 1,000 prompts per task; the paper's up to 10,000
    per_device = b / (step_s * work["steps"])  # samples/s: `steps` guided steps per sample
    hours = {f"{w['per_task']} prompts per task": {k: round(w["total"] / (per_device * k) / 3600, 2) for k in (1, 8)}
             for w in (work, full)}
    return {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
            "batch": b, "dtype": "fp32" if args.fp32 else "bf16 autocast", "guided_step_s_median": round(step_s, 4),
            "samples_per_s_per_device": round(per_device, 3), "paper_work_list": [work, full],
            "projected_hours_on_1_and_8_devices": hours}


def study(args) -> dict:
    from flows.plan import Plan
    from flows.profiles import load_profile
    from pd_data.config import PromptConfig
    from pd_data.dataset import load_split
    from pd_data.prompts import materialise_prompts
    from pd_core.state import StateDir
    from pd_data.tasks import TRAINING_TASKS
    from pd_eval.config import EvalConfig
    from pd_eval.evaluate import Split, evaluate_folders
    from pd_eval.generation import run_generation

    plan = Plan.build(load_profile(args.profile), StateDir.resolve(args.state))
    folder = plan.dir("train") / "prompt-diffusion"
    if not (folder / "losses.json").exists():
        raise SystemExit(f"no trained Prompt Diffusion model at {folder} for the current code and profile "
                         f"{args.profile!r}; run `pd run --profile {args.profile}` with PD_STATE_DIR={args.state} first")
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-eval-"))
    prompts = work / "prompts.parquet"
    data = load_split(plan.dir("ingest"), plan.dir("annotate"), "test", plan.profile.data.pairing)
    materialise_prompts(data, TRAINING_TASKS, PromptConfig(per_task=args.per_task, split="test"), prompts)
    w = {"base": plan.dir("base"), "pd": folder, "images": plan.dir("ingest"), "annotations": plan.dir("annotate"),
         "prompts": prompts, "split": "test"}
    where = Split(w["images"], w["annotations"], "test", prompts, plan.profile.data.pairing, baselines=False)
    rows, rates = {}, {}
    for sched, steps in SAMPLERS:
        name = f"{sched}-{steps}"
        cfg = EvalConfig(scheduler=sched, steps=steps, guidance_scale=args.guidance, map_guidance_scale=args.map_guidance,
                         batch_size=16, threads=args.threads, device=args.device, bootstrap=args.bootstrap)
        out = work / name
        job = job_for(w, cfg, out)
        with stopwatch() as lap:
            n = run_generation(job, args.processes)
        rates[name] = n / lap.seconds if n else None
        result = evaluate_folders(w["base"], {"prompt-diffusion": folder}, (), where, cfg, out, task_inference=False,
                                  cache=work / "cache")
        rows[name] = {(r.task, r.metric): (r.value, r.ci_low, r.ci_high) for r in result.metrics
                      if r.metric in ("rmse", "fid", "kid")}
        print(f"{name}: {rates[name] or 0:.2f} samples/s", file=sys.stderr, flush=True)
    ref = rows["ddim-100"]
    holds = {name: all(ref[k][1] <= v[0] <= ref[k][2] for k, v in r.items() if k[1] != "kid") for name, r in rows.items()}
    fastest = min((n for n, ok in holds.items() if ok and n != "ddim-100"), key=lambda n: int(n.split("-")[1]), default=None)
    return {"state": str(args.state), "guidance": args.guidance, "map_guidance": args.map_guidance,
            "per_task": args.per_task, "processes": args.processes, "threads": args.threads,
            "samples_per_s": {k: round(v, 2) if v else None for k, v in rates.items()},
            "metrics": {name: {f"{m} {t}": [round(x, 4) for x in v] for (t, m), v in r.items()} for name, r in rows.items()},
            "within_ddim100_interval_on_every_task": holds, "fastest_that_holds": fastest, "work": str(work)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput", help="samples/s on this machine; with --paper-size, the paper protocol's cost")
    t.add_argument("--configs", default="1x1,2x1,1x2", help="processes x CPU threads each, comma-separated")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--paper-size", action="store_true")
    t.add_argument("--device", default="cpu")
    t.add_argument("--fp32", action="store_true", help="with --paper-size: no bf16 autocast")
    s = sub.add_parser("samplers", help="DDIM 100 against fast samplers on a demo run's trained model")
    s.add_argument("--state", required=True, help="the demo run's state directory (PD_STATE_DIR)")
    s.add_argument("--profile", default="demo")
    s.add_argument("--per-task", type=int, default=32)
    s.add_argument("--guidance", type=float, default=9.0, help="text guidance of every task (the paper's 9)")
    s.add_argument("--map-guidance", type=float, default=None, help="text guidance of image->map (default: --guidance)")
    s.add_argument("--processes", type=int, default=1)
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    s.add_argument("--threads", type=int, default=2, help="CPU threads per process (1x2 was the fastest here)")
    s.add_argument("--bootstrap", type=int, default=200)
    s.add_argument("--out", default=None, help="keep the samples here (default: a temporary folder)")
    args = ap.parse_args()
    from pd_core.progress import set_sink

    set_sink(lambda r: print(r.line, file=sys.stderr, flush=True))  # stdout holds the JSON only
    if args.mode == "throughput":
        result = throughput_paper(args) if args.paper_size else throughput_cpu(args)
    else:
        result = study(args)
    emit({**result, "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
