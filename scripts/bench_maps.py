"""Image->map RMSE of training/sampling variants against the copy-query, mean-map and copy-example baselines.

Reuses a profile's cached data and base (run the profile once first, e.g. `make benchmark`),
trains one ControlNet per variant in this process, and scores it on the profile's materialised
image->map evaluation prompts with the benchmark's own sampler and RMSE. Prints one table.

    .venv/bin/python scripts/bench_maps.py --variant pd:train.steps=480 \
        --variant pd-snr:train.steps=480,train.snr_gamma=5 --variant cnft:mode=cn-ft,train.steps=80

A variant is `name:key=value,...`; `mode=cn-ft` trains one CN(FT) per image->map task instead of
the joint model, `load=PATH` scores a trained Prompt Diffusion folder (`.pd/models/train/KEY/prompt-diffusion`)
without training, and `eval.*` keys change only the sampler.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import append_line, clock, dumps, machine

if TYPE_CHECKING:
    from pd_data.dataset import SplitData


def parse_variant(text: str) -> tuple[str, str, dict]:
    from flows.profiles import merge_settings, parse_override, split_overrides
    from pd_model.controlnet import as_kind

    name, _, rest = text.partition(":")
    mode, over = "prompt-diffusion", {}
    for item in split_overrides(rest):
        if item.startswith("mode="):
            mode = as_kind(item.split("=", 1)[1])
        elif item.startswith("load="):  # a trained model folder (train stage): score it, train nothing
            mode = item
        else:
            over = merge_settings(over, parse_override(item))
    return name, mode, over


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--split", default=None, help="score prompts of this split (default: the profile's evaluation split; "
                    "use val to choose settings without looking at the benchmark's prompts)")
    ap.add_argument("--evals", default="", help="sampler settings to score each model with, as steps:guidance[:pair_guidance],... "
                    "(default: the profile's eval.steps and eval.guidance_scale)")
    ap.add_argument("--cache", default=None, help="save each variant's ControlNets here and reuse them when the variant "
                    "text is the same (sampler-only comparisons then skip training)")
    ap.add_argument("--out", default=None, help="append result rows (JSON lines) here")
    return ap.parse_args()


def parse_evals(text: str, variants: list[tuple[str, str, dict]]) -> list[tuple[float, ...]]:
    """--evals as (steps, guidance[, pair guidance]) tuples; pair guidance with a CN(FT) variant is an
    error now, before any training."""
    evals = [tuple(map(float, e.split(":"))) for e in text.split(",") if e]
    cnft = [name for name, mode, _ in variants if mode == "cn-ft"]
    if cnft and any(len(e) > 2 for e in evals):
        raise SystemExit(f"--evals {text}: pair guidance (a third number) acts on Prompt Diffusion's example pair, "
                         f"and variant(s) {cnft} are CN(FT); score them in a run without pair guidance")
    return evals


@dataclasses.dataclass
class MapPrompts:
    """The image->map evaluation prompts every model is scored on, built once, per task."""

    tasks: list[str]
    rows: dict[str, list[dict]]  # the prompts' rows (ids, seeds)
    built: dict[str, list]  # the prompts themselves
    targets: dict[str, np.ndarray]  # the true maps

    def rmse(self, task: str, outputs: np.ndarray) -> float:
        from pd_eval.metrics import rmse

        return rmse(outputs, self.targets[task], 0).value


def cached_plan(profile: str, state_dir: str | None):
    """The profile's plan, whose data, prompts and base stages must already be in the state directory."""
    from flows.runner import make_plan

    plan0 = make_plan(profile, None, state_dir)
    for stage in ("ingest", "annotate", "prompts", "base"):
        if not plan0.dir(stage).exists():
            raise SystemExit(f"no cached {stage} stage at {plan0.dir(stage)}; run the {profile} profile once first")
    return plan0


def map_prompts(plan0, split: str) -> tuple[MapPrompts, SplitData]:
    """The image->map prompts of `split` (the plan's own when it is the evaluation split, else drawn here)
    and the training split."""
    from pd_data.dataset import load_split
    from pd_data.prompts import materialise_prompts
    from pd_data.tasks import get_task
    from pd_eval.benchmark import evaluation_prompts

    data = load_split(plan0.dir("ingest"), plan0.dir("annotate"), split, plan0.profile.data.pairing)
    train = load_split(plan0.dir("ingest"), plan0.dir("annotate"), "train", plan0.profile.data.pairing)
    map_tasks = [t for t in plan0.tasks if get_task(t).metric == "rmse"]
    prompts_path = plan0.dir("prompts") / "prompts.parquet"
    if split != plan0.profile.prompts.split:  # choose settings on held-out prompts that the benchmark never scores
        prompts_path = Path(tempfile.mkdtemp()) / "prompts.parquet"
        materialise_prompts(data, tuple(map_tasks), plan0.profile.prompts.model_copy(update={"split": split}), prompts_path)
    rows_all = evaluation_prompts(prompts_path, plan0.profile.eval)
    by_task = {t: [r for r in rows_all if r["task"] == t] for t in map_tasks}
    built = {t: [data.prompt(get_task(t), r["example_id"], r["query_id"]) for r in rs] for t, rs in by_task.items()}
    targets = {t: np.stack([p.target for p in b]) for t, b in built.items()}
    return MapPrompts(map_tasks, by_task, built, targets), train


def baseline_rmse(prompts: MapPrompts, train: SplitData) -> dict[str, dict[str, float]]:
    """baseline -> task -> RMSE of the copy-query, mean-map and copy-example baselines."""
    from pd_data.tasks import get_task
    from pd_eval.baselines import BASELINES, baseline_outputs

    return {name: {t: prompts.rmse(t, baseline_outputs(name, get_task(t), prompts.built[t], train)) for t in prompts.tasks}
            for name in BASELINES}


def variant_nets(plan, mode: str, over: dict, cache: str | None, map_tasks: list[str],
                 train: SplitData) -> tuple[dict[str, tuple], float]:
    """(task -> (ControlNet, its own UNet when the decoder was trained too, else None), seconds) of one
    variant: loaded (load=), reused from --cache or trained here; the seconds are the time that took."""
    from flows.stages import base_path
    from pd_model.base import load_base
    from pd_model.controlnet import kind_of
    from pd_model.pipeline import load_trained, save_trained
    from pd_model.train import ModelSpec, train_controlnet

    cfg = plan.profile.train
    t0 = clock()
    nets: dict[str, tuple] = {}
    folder = Path(cache) / hashlib.sha1(json.dumps([mode, over], sort_keys=True).encode()).hexdigest()[:12] \
        if cache else None
    groups = [(plan.tasks, "pd", 0)] if mode == "prompt-diffusion" else \
        [((t,), t.replace("->", "-to-"), 1000 * (k + 1)) for k, t in enumerate(map_tasks)]
    if mode.startswith("load="):
        meta, net, unet = load_trained(mode.split("=", 1)[1])
        if kind_of(net) != "prompt-diffusion" and len(meta["tasks"]) == 1:
            raise SystemExit("load= takes a Prompt Diffusion model folder (a CN(FT) answers one task only)")
        groups, mode = [], kind_of(net)
        nets = {t: (net, unet) for t in map_tasks}
    for tasks, sub, seed_offset in groups:
        if folder is not None and (folder / sub / "pipeline.json").exists():
            _, net, unet = load_trained(folder / sub)
        else:
            fresh = load_base(base_path(plan)).freeze()  # a trained decoder changes the base in place: one copy per model
            net, _ = train_controlnet(fresh, train, cfg, ModelSpec(sub, mode, tasks, cfg.steps, seed_offset))
            unet = fresh.unet if cfg.train_unet_decoder else None
            if folder is not None:
                save_trained(folder / sub, net, fresh, "", mode, tasks, cfg.train_unet_decoder)
        for t in map_tasks if mode == "prompt-diffusion" else tasks:
            nets[t] = (net, unet)
    return nets, clock() - t0


def score_nets(base, nets: dict[str, tuple], ev, evals: list[tuple[float, ...]],
               prompts: MapPrompts) -> Iterator[tuple[int, float, float | None, dict[str, float]]]:
    """(steps, guidance, pair guidance, task -> RMSE) of a variant's models under each sampler setting
    of --evals (default: the profile's), with the benchmark's own sampler."""
    from pd_model.config import Sampler
    from pd_model.sampling import generate

    for steps, guidance, *pair in evals or [(ev.steps, ev.guidance_scale)]:
        pair_g = pair[0] if pair else None
        res = {}
        for t in prompts.tasks:
            net, unet = nets[t]
            model_base = base.with_unet(unet)
            built, rows = prompts.built[t], prompts.rows[t]
            outs = [generate(model_base, net, built[i:i + ev.batch_size], [r["seed"] for r in rows[i:i + ev.batch_size]],
                             Sampler(ev.scheduler, int(steps), guidance, pair_g))
                    for i in range(0, len(built), ev.batch_size)]
            res[t] = prompts.rmse(t, np.concatenate(outs))
        yield int(steps), guidance, pair_g, res


def print_row(row: dict, out: str | None, where: dict) -> None:
    """One result row as a JSON line (floats to 4 places), appended with the machine to --out."""
    print(dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, indent=None), flush=True)
    if out:
        append_line(out, {**row, "machine": where})


def print_table(results: dict[str, dict[str, float]], tasks: list[str]) -> None:
    print("\n| model | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for name, res in results.items():
        print(f"| {name} | " + " | ".join(f"{res[t]:.3f}" for t in tasks) + " |")


def main() -> None:
    args = parse_args()
    variants = [parse_variant(text) for text in args.variant]
    evals = parse_evals(args.evals, variants)

    from flows.runner import make_plan
    from flows.stages import base_path
    from pd_model.base import load_base

    plan0 = cached_plan(args.profile, args.state_dir)
    prompts, train = map_prompts(plan0, args.split or plan0.profile.prompts.split)
    where = machine()
    results = baseline_rmse(prompts, train)
    for text, (name, mode, over) in zip(args.variant, variants):
        plan = make_plan(args.profile, over, args.state_dir)
        base = load_base(base_path(plan)).freeze()
        train.pairing = plan.profile.data.pairing  # a variant may train under another pairing (data.pairing=any)
        ev = plan.profile.eval
        nets, train_s = variant_nets(plan, mode, over, args.cache, prompts.tasks, train)
        for steps, guidance, pair_g, res in score_nets(base, nets, ev, evals, prompts):
            label = f"{name} ({ev.scheduler} {steps} steps, guidance {guidance:g}" + (f", pair {pair_g:g})" if pair_g else ")")
            results[label] = res
            print_row({"variant": text, "steps": steps, "guidance": guidance, "pair_guidance": pair_g,
                       "train_s": round(train_s, 1), **res}, args.out, where)
    print_table(results, prompts.tasks)


if __name__ == "__main__":
    main()
