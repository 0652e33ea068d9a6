"""The evaluate stage's metrics on a demo-sized workload, without training or generating anything.

    .venv/bin/python scripts/bench_metrics.py build --dir /tmp/bm          # the world, once (about 10 s)
    .venv/bin/python scripts/bench_metrics.py time --dir /tmp/bm           # one timed evaluation, JSON
    .venv/bin/python scripts/bench_metrics.py compare --dir /tmp/bm --old /tmp/old --repeats 3

`build`: the demo profile's dataset (80 groups x 3 layouts at 32 px, its annotators), its prompts
(16 per task, every trained and unseen task), the model folders' `pipeline.json` of Prompt Diffusion
and the six CN(FT)s (no weights: nothing is generated), and a PNG for every sample of the demo's
work list (312: the models' requests and task inference). A sample is its prompt's target blended
with a seeded other target of the split and noise, so that features and maps look like outputs, not
like copies of the answers.

`time`: `pd_eval.evaluate.evaluate_folders` on that folder as the evaluate stage calls it (the demo's
EvalConfig, a fresh reference-features cache), every sample on disk: what is timed is what the
docs/benchmarks.md calls "metrics read back from the PNGs" (reals and baselines written once by the first run,
then read; grids; task inference). Prints the seconds and a SHA-256 of every metric row's numbers
(their float hex), so runs of two code versions can be compared bit for bit.

`compare`: `time` in fresh processes, alternating the code under --old (a copy of `pd_eval/` taken
before a change, e.g. `git archive HEAD pd_eval | tar -x -C /tmp/old`, put first on PYTHONPATH) and
this checkout's, --repeats times each; the medians and whether every metric row is bitwise the same.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import ROOT, emit, machine, median, ratio, schedule, stopwatch, write_json


def build(d: Path) -> dict:
    import numpy as np

    from flows.profiles import load_profile
    from pd_data.annotate import annotate_shard
    from pd_data.dataset import load_split
    from pd_data.ingest import ingest
    from pd_data.prompts import materialise_prompts
    from pd_core.state import atomic_write_json
    from pd_data.tasks import TRAINING_TASKS, UNSEEN_TASKS, get_task
    from pd_eval.benchmark import evaluation_prompts, models_under_test, requests, slug
    from pd_eval.generation import paths, save_png
    from pd_eval.task_inference import inference_request

    demo = load_profile("demo")
    ingest(demo.data, d / "img")
    for p in sorted((d / "img").glob("images-*.parquet")):
        annotate_shard(p, d / "ann" / p.name.replace("images", "annotations"), demo.data.annotators)
    data = load_split(d / "img", d / "ann", demo.prompts.split, demo.data.pairing)
    unseen = tuple(t for t in UNSEEN_TASKS if all(m in demo.data.modalities for m in get_task(t).modalities))
    materialise_prompts(data, TRAINING_TASKS + unseen, demo.prompts, d / "prompts.parquet")
    nets = {"prompt-diffusion": ("prompt-diffusion", TRAINING_TASKS)}
    nets |= {f"cn-ft_{slug(t)}": ("cn-ft", (t,)) for t in TRAINING_TASKS}
    for name, (kind, tasks) in nets.items():
        atomic_write_json(d / "models" / name / "pipeline.json", {"kind": kind, "tasks": list(tasks), "base": "none"})
    cfg = demo.eval
    prompts = evaluation_prompts(d / "prompts.parquet", cfg)
    reqs = requests(models_under_test(nets, unseen), prompts, cfg)
    reqs.append(inference_request(prompts, cfg.task_inference_queries, "prompt-diffusion", cfg))
    targets = [a[m] for a in data.arrays.values() for m in a if m != "image"] + [a["image"] for a in data.arrays.values()]
    n = 0
    for r in reqs:
        for p, it in zip(paths(d / "eval", r), r.items):
            rng = np.random.default_rng([it.seed, n])
            truth = data.prompt(get_task(it.task), it.example_id, it.query_id).target.astype(np.float64)
            other = targets[int(rng.integers(len(targets)))].astype(np.float64)
            w = rng.uniform(0.3, 0.9)
            a = w * truth + (1 - w) * other + rng.normal(0, 12, truth.shape)
            save_png(p, np.clip(np.rint(a), 0, 255).astype(np.uint8))
            n += 1
    return {"dir": str(d), "samples": n, "requests": len(reqs), "unseen": unseen}


def digest(rows) -> tuple[str, int]:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: (r.model_id, r.task, r.metric)):
        h.update(f"{r.model_id}|{r.task}|{r.metric}|{r.n}|{r.feature_extractor}|{r.protocol}|".encode())
        h.update("|".join(float(x).hex() for x in (r.value, r.ci_low, r.ci_high)).encode())
    return h.hexdigest(), len(rows)


def time_once(d: Path, dump: Path | None = None) -> dict:
    import pd_eval
    from flows.profiles import load_profile
    from pd_data.tasks import UNSEEN_TASKS, get_task
    from pd_eval.evaluate import Split, evaluate_folders

    demo = load_profile("demo")
    unseen = tuple(t for t in UNSEEN_TASKS if all(m in demo.data.modalities for m in get_task(t).modalities))
    folders = {p.name: p for p in sorted((d / "models").iterdir())}
    where = Split(d / "img", d / "ann", demo.prompts.split, d / "prompts.parquet", demo.data.pairing)
    with tempfile.TemporaryDirectory() as cache, stopwatch() as lap:
        result = evaluate_folders("unused", folders, unseen, where, demo.eval, d / "eval", cache=Path(cache))
    if result.computed:
        raise SystemExit(f"{result.computed} samples were generated: run `build` first")
    if dump is not None:
        write_json(dump, [[r.model_id, r.task, r.metric, r.n, r.feature_extractor, float(r.value).hex(),
                           float(r.ci_low).hex(), float(r.ci_high).hex()] for r in result.metrics], indent=0)
    sha, n = digest(result.metrics)
    return {"seconds": round(lap.seconds, 2), "rows": n, "sha256": sha, "code": str(Path(pd_eval.__file__).parent)}


def compare(args) -> dict:
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _, which in schedule(runs, args.repeats):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(([args.old] if which == "old" else []) + [str(ROOT)])
        # -P -m: nothing ahead of PYTHONPATH on the child's sys.path, so --old's pd_eval comes first
        out = subprocess.run([sys.executable, "-P", "-m", "scripts.bench_metrics", "time", "--dir", args.dir], env=env,
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        runs[which].append(json.loads(out))
        print(which, runs[which][-1], file=sys.stderr, flush=True)
    seconds = {k: [r["seconds"] for r in v] for k, v in runs.items()}
    shas = {r["sha256"] for v in runs.values() for r in v}
    return {"seconds": seconds, "median_s": {k: median(v) for k, v in seconds.items()},
            "speedup": round(ratio(seconds["old"], seconds["new"]), 2), "bitwise_identical": len(shas) == 1,
            "sha256": sorted(shas), "code": {k: v[0]["code"] for k, v in runs.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("build", "time", "compare"):
        s = sub.add_parser(name)
        s.add_argument("--dir", required=True)
        if name == "time":
            s.add_argument("--dump", default=None, help="write every metric row (floats as hex) to this JSON file")
        if name == "compare":
            s.add_argument("--old", required=True, help="a folder holding the old pd_eval/ package")
            s.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from pd_core.progress import set_sink

    set_sink(lambda r: None)  # stdout holds the JSON only
    if args.mode == "build":
        result = build(Path(args.dir))
    elif args.mode == "time":
        result = time_once(Path(args.dir), Path(args.dump) if args.dump else None)
    else:
        result = compare(args)
    emit({**result, "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
