"""Does Prompt Diffusion read its example pair? Train recipe variants at several seeds, score on validation prompts.

Reuses a profile's cached data, base and demo re-annotator (run the profile once first, e.g.
`make benchmark`), trains Prompt Diffusion alone per (variant, seed) in this process and scores it
on prompts of the validation split (never the test prompts that Table 1 reports), drawn once:

- task inference: each query with the example pairs of image->depth, image->hed and image->seg and
  no text; the share of outputs nearest the shown task's true map (`pd_eval.task_inference`);
- per trained task, the same query and seed with its own pair, the pair zeroed and the pair of
  another task (`other_pair_task`): the task's metric under each (image->map: RMSE to the true map;
  map->image: controllability, the re-annotator's headline score against the query map) and the
  paired output change (per-image RMSE on 0..1 between own-pair and other-pair outputs);
- per unseen task, own pair against zeroed pair.

    .venv/bin/python scripts/study_icl.py --seeds 0,1,2 --out docs/study-icl.jsonl \\
        --variant paper: --variant ctx-drop50:train.pair_context=true,train.drop_text=0.5

A variant is `name:key=value,...` (profile overrides). Each (variant, seed) prints one JSON line and
appends it to --out; trained models are kept under --cache and reused when the same key comes back.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import append_line, clock, dumps, machine

if TYPE_CHECKING:
    from pd_data.dataset import SplitData
    from pd_data.tasks import Prompt
    from pd_eval.config import EvalConfig
    from pd_eval.reannotate import ReAnnotators


def parse_variant(text: str) -> tuple[str, dict]:
    from flows.profiles import merge_settings, parse_override, split_overrides

    name, _, rest = text.partition(":")
    over: dict = {}
    for item in split_overrides(rest):
        over = merge_settings(over, parse_override(item))
    return name, over


def interval(x: np.ndarray, seed: int = 0, resamples: int = 1000) -> tuple[float, float, float]:
    """Mean of `x` and its 95% bootstrap interval."""
    r = np.random.default_rng(seed)
    means = x[r.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--table", default=None, help="print the ablation table of a --out file (Markdown) and exit")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--per-task", type=int, default=12, help="validation prompts per trained task")
    ap.add_argument("--unseen", type=int, default=8, help="validation prompts per unseen task")
    ap.add_argument("--queries", type=int, default=16, help="task-inference queries (x3 example pairs)")
    ap.add_argument("--base", default=None, help="a trained base folder to use instead of the plan's (a code change "
                    "anywhere in the base stage's modules moves its key; its weights may still be the right ones)")
    ap.add_argument("--cache", default=None, help="trained models by train key (default: <state>/cache/study-icl)")
    ap.add_argument("--out", default=None, help="append one JSON line per (variant, seed) here")
    args = ap.parse_args()
    if not args.table and not args.variant:
        ap.error("give at least one --variant (or --table FILE)")
    return args


@dataclass
class Probe:
    """The validation prompts every (variant, seed) is scored on, drawn once, and how to sample and
    score them: the profile's sampler and, for map->image, the demo re-annotators."""

    val: SplitData
    by_task: dict[str, list[dict]]  # task -> its prompt rows (ids, seeds)
    ev: EvalConfig
    readers: ReAnnotators

    def prompt(self, task: str, r: dict, pair_task: str = "", no_text: bool = False) -> Prompt:
        """The prompt of row `r`, showing `pair_task`'s example pair instead of its own if given."""
        from pd_data.tasks import Prompt, get_task

        p = self.val.prompt(get_task(task), r["example_id"], r["query_id"])
        if pair_task:
            shown = self.val.prompt(get_task(pair_task), r["example_id"], r["query_id"])
            p = Prompt(p.task, shown.example_source, shown.example_target, p.query, p.target, p.text)
        return replace(p, text="") if no_text else p

    def sample(self, base, net, prompts: list[Prompt], seeds: list[int], guidance: float,
               empty_pair: bool = False) -> np.ndarray:
        from pd_model.config import Sampler
        from pd_model.sampling import generate

        ev = self.ev
        return np.concatenate([generate(base, net, prompts[i:i + ev.batch_size], seeds[i:i + ev.batch_size],
                                        Sampler(ev.scheduler, ev.steps, guidance), empty_pair=empty_pair)
                               for i in range(0, len(prompts), ev.batch_size)])

    def score(self, task: str, outs: np.ndarray, prompts: list[Prompt]) -> tuple[str, np.ndarray]:
        """(metric name, per-image values, lower is better) of `task`."""
        from pd_data.tasks import get_task
        from pd_eval.control import control_spec
        from pd_eval.metrics import per_image_mse

        spec = get_task(task)
        if spec.metric == "rmse":
            return "rmse", np.sqrt(per_image_mse(outs, np.stack([p.target for p in prompts])))
        cs = control_spec(spec.source)
        read = self.readers.read(outs, spec.source)
        name = cs.headline(*outs.shape[1:3]) if spec.source != "seg" else "ctrl_pixel_acc"  # per-image scores (dataset mIoU is not)
        vals = cs.score(read, np.stack([p.query for p in prompts]), self.readers.palette[spec.source]) if cs.needs_palette \
            else cs.score(read, np.stack([p.query for p in prompts]))
        v = vals[name]
        return name, (-v if cs.higher_is_better(name) else v)  # lower is better, always

    def task_inference(self, base, net, queries: int) -> dict:
        """Each query with the example pairs of every forward task and no text, at image->depth's guidance:
        the share of outputs nearest the shown task's true map, and per shown task what was predicted."""
        from pd_data.tasks import FORWARD_TASKS, get_task
        from pd_eval.task_inference import classify

        qs = self.by_task[FORWARD_TASKS[0]][:queries]
        ti_prompts = [self.prompt(FORWARD_TASKS[0], r, t, no_text=True) for r in qs for t in FORWARD_TASKS]
        outs = self.sample(base, net, ti_prompts, [int(r["seed"]) for r in qs for _ in FORWARD_TASKS],
                           self.ev.guidance_for(get_task(FORWARD_TASKS[0])))
        shown = [t for _ in qs for t in FORWARD_TASKS]
        pred = [classify(o, {t: self.val.arrays[p_r["query_id"]][get_task(t).target] for t in FORWARD_TASKS}, p.example_target)
                for o, p, p_r in zip(outs, ti_prompts, [r for r in qs for _ in FORWARD_TASKS])]
        hits = np.array([s == p for s, p in zip(shown, pred)], float)
        return {"task_inference": interval(hits),
                "ti_predicted": {t: [p for s, p in zip(shown, pred) if s == t] for t in FORWARD_TASKS}}

    def pair_effects(self, base, net, task: str, n: int, trained_tasks) -> dict:
        """`task`'s metric on `n` prompts with their own pair, the pair zeroed and (a trained task) another
        task's pair, and how much the output changes between them."""
        from pd_data.tasks import get_task, other_pair_task
        from pd_eval.metrics import per_image_mse

        spec, rs = get_task(task), self.by_task[task][:n]
        g, seeds = self.ev.guidance_for(spec), [int(r["seed"]) for r in rs]
        own_p = [self.prompt(task, r) for r in rs]
        own = self.sample(base, net, own_p, seeds, g)
        zero = self.sample(base, net, own_p, seeds, g, empty_pair=True)
        metric, s_own = self.score(task, own, own_p)
        _, s_zero = self.score(task, zero, own_p)
        res = {"metric": metric, "own": interval(s_own), "zero": interval(s_zero),
               "own_minus_zero": interval(s_own - s_zero),
               "change_zero": interval(np.sqrt(per_image_mse(own, zero)))}
        other = other_pair_task(task, trained_tasks) if spec.trained else None
        if other:
            oth = self.sample(base, net, [self.prompt(task, r, other) for r in rs], seeds, g)
            _, s_oth = self.score(task, oth, own_p)
            res |= {"other": interval(s_oth), "own_minus_other": interval(s_own - s_oth),
                    "change_other": interval(np.sqrt(per_image_mse(own, oth)))}
        return res


def cached_plan(args: argparse.Namespace):
    """The profile's plan, whose data (and base, unless --base) must already be in the state directory."""
    from flows.runner import make_plan

    plan0 = make_plan(args.profile, None, args.state_dir)
    for stage in ("ingest", "annotate") + (() if args.base else ("base",)):
        if not plan0.dir(stage).exists():
            raise SystemExit(f"no cached {stage} stage at {plan0.dir(stage)}; run the {args.profile} profile once first")
    return plan0


def make_probe(plan0, args: argparse.Namespace, cache: Path) -> tuple[Probe, SplitData]:
    """(the probe over validation prompts, drawn once and kept in `cache`, and the training split)."""
    import pyarrow.parquet as pq

    from pd_data.config import PromptConfig
    from pd_data.dataset import load_split
    from pd_data.prompts import materialise_prompts
    from pd_eval.reannotate import ReAnnotators

    pairing = plan0.profile.data.pairing
    train = load_split(plan0.dir("ingest"), plan0.dir("annotate"), "train", pairing)
    val = load_split(plan0.dir("ingest"), plan0.dir("annotate"), "val", pairing)
    ev, data_cfg = plan0.profile.eval, plan0.profile.data
    readers = ReAnnotators(data_cfg.annotators, data_cfg.annotator_weights, train, plan0.state.root / "cache", ev.reader_steps,
                           ev.seed)
    n_max = max(args.per_task, args.unseen, args.queries)
    prompts_path = cache / f"val-prompts-{n_max}.parquet"
    if not prompts_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        materialise_prompts(val, plan0.eval_tasks, PromptConfig(per_task=n_max, split="val", seed=plan0.profile.prompts.seed),
                            prompts_path)
    rows = pq.read_table(prompts_path).to_pylist()
    by_task = {t: [r for r in rows if r["task"] == t] for t in plan0.eval_tasks}
    return Probe(val, by_task, ev, readers), train


def trained_model(plan, folder: Path, base_dir: str, train: SplitData):
    """(base with the model's UNet, ControlNet, training seconds or None) of Prompt Diffusion at the
    plan's settings on the base in `base_dir`: loaded from `folder` when it was trained before, else
    trained and saved there."""
    from pd_model.base import load_base
    from pd_model.pipeline import load_trained, save_trained
    from pd_model.train import ModelSpec, train_controlnet

    cfg = plan.profile.train
    t0 = clock()
    if (folder / "pipeline.json").exists():
        _, net, unet = load_trained(folder)
        return load_base(base_dir).freeze().with_unet(unet), net, None
    base = load_base(base_dir).freeze()
    net, _ = train_controlnet(base, train, cfg, ModelSpec("prompt-diffusion", "prompt-diffusion", plan.tasks, cfg.steps))
    save_trained(folder, net, base, "", "prompt-diffusion", plan.tasks, cfg.train_unet_decoder)
    return base, net, round(clock() - t0, 1)


def study(text: str, seed: int, args: argparse.Namespace, probe: Probe, cache: Path, train: SplitData) -> dict:
    """The result row of one (variant, seed): train (or reuse) its model, then task inference and the
    pair effects of every evaluation task."""
    from flows.profiles import merge_settings
    from flows.runner import make_plan
    from flows.stages import base_path
    from pd_data.tasks import get_task

    name, over = parse_variant(text)
    plan = make_plan(args.profile, merge_settings(over, {"train": {"seed": seed, "baseline_steps_per_task": 0}}), args.state_dir)
    folder, base_dir = cache / plan.key("train"), args.base or base_path(plan)
    t0 = clock()
    base, net, train_s = trained_model(plan, folder, base_dir, train)
    row: dict = {"variant": name, "overrides": text.partition(":")[2], "seed": seed, "train_key": plan.key("train"),
                 "train_s": train_s}
    row |= probe.task_inference(base, net, args.queries)
    for task in plan.eval_tasks:
        n = args.per_task if get_task(task).trained else args.unseen
        row[task] = probe.pair_effects(base, net, task, n, plan.tasks)
    row["total_s"] = round(clock() - t0, 1)
    return row


def main() -> None:
    args = parse_args()
    if args.table:
        print(ablation_table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
        return
    plan0 = cached_plan(args)
    cache = Path(args.cache) if args.cache else plan0.state.root / "cache" / "study-icl"
    probe, train = make_probe(plan0, args, cache)
    where = machine()
    for text in args.variant:
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = study(text, seed, args, probe, cache, train)
            print(dumps(row, indent=None), flush=True)
            if args.out:
                append_line(args.out, {**row, "machine": where})


def _cell(x: list[float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{x[0] * scale:.{digits}f} [{x[1] * scale:.{digits}f}, {x[2] * scale:.{digits}f}]"


def ablation_table(rows: list[dict]) -> str:
    """One line per (variant, seed): task inference; image->map RMSE (own pair); per trained task whether
    another task's pair changes the output beyond its interval and whether the own pair beats the zeroed
    one; unseen tasks where the pair helps. Then the mean over seeds of each variant."""
    trained = ["image->depth", "image->hed", "image->seg", "depth->image", "hed->image", "seg->image"]
    head = ("| variant | seed | task inference | RMSE depth / hed / seg | control: depth MSE / hed SSIM / seg pixel acc "
            "| pair changes output (of 6) | own pair beats zeroed (of 6) | unseen: pair helps (of 4) | train s |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines, agg = [head], {}
    for r in rows:
        unseen = [t for t, v in r.items() if isinstance(v, dict) and "metric" in v and t not in trained]
        changes = sum(r[t]["own_minus_other"][1] > 0 or r[t]["own_minus_other"][2] < 0  # the interval excludes 0
                      for t in trained if "own_minus_other" in r[t])
        beats = sum(r[t]["own_minus_zero"][2] < 0 for t in trained)
        helps = sum(r[t]["own_minus_zero"][2] < 0 for t in unseen)
        rmse = " / ".join(f"{r[t]['own'][0]:.3f}" for t in trained[:3])
        ctrl = [abs(r[t]["own"][0]) for t in trained[3:]]  # stored lower-is-better: similarities negated
        lines.append(f"| {r['variant']} | {r['seed']} | {_cell(r['task_inference'], digits=2)} | {rmse} | "
                     f"{ctrl[0]:.3f} / {ctrl[1]:.3f} / {ctrl[2]:.3f} | {changes} | {beats} | {helps} | {r.get('train_s') or ''} |")
        a = agg.setdefault(r["variant"], [])
        a.append([r["task_inference"][0], *[r[t]["own"][0] for t in trained[:3]], changes, beats, helps, *ctrl])
    lines += ["", "| variant | seeds | task inference | RMSE depth / hed / seg | control: depth MSE / hed SSIM / seg pixel "
                  "acc | pair changes output | own beats zeroed | unseen: pair helps |", "|---|---|---|---|---|---|---|---|"]
    for v, a in agg.items():
        m = np.mean(np.array(a), axis=0)
        lines.append(f"| {v} | {len(a)} | {m[0]:.2f} (min {min(x[0] for x in a):.2f}) | {m[1]:.3f} / {m[2]:.3f} / {m[3]:.3f} "
                     f"| {m[7]:.3f} / {m[8]:.3f} / {m[9]:.3f} | {m[4]:.1f} | {m[5]:.1f} | {m[6]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
