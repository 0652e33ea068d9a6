"""Data path at scale: training's peak memory against dataset size, time waiting for data, annotation speed.

    .venv/bin/python scripts/bench_data.py rss  [--sizes 1000 4000 16000] [--resolution 64] [--steps 20]
    .venv/bin/python scripts/bench_data.py wait [--steps 60] [--workers 0 1]
    .venv/bin/python scripts/bench_data.py annotate [...]     # scripts/bench_annotate.py
    .venv/bin/python scripts/bench_data.py all --json out.json

`rss`: procedural datasets of each size (groups of 2 layouts x 2 twins, six exact maps each) are
ingested and annotated once into a cache folder; then, for each size, a fresh process trains the
joint ControlNet for --steps steps (demo batch 16, tiny untrained base at that resolution) reading
the split the way the train stage does (`load_split`: lazy decoding, bounded cache) and reports its
peak RSS; another fresh process loads the split the old way (every image and map decoded into RAM,
`split_from_tables`, no training) and reports its peak. The streamed figure should stay flat
(within 1.25x of the smallest size); the in-memory one grows with the data.

`wait`: the demo configuration (480 images at 32 px, batch 16) trained for --steps steps with each
--workers loader setting, alternating, --repeats times; reports the median fraction of training wall
time spent waiting for the next batch (`train_controlnet(stats=...)`), the same after the first
batch (whose wait includes starting the loader's worker processes), and step time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import ROOT, clock, dumps, emit, machine, median, peak_rss_mb, schedule


def make_data(folder: Path, images: int, resolution: int, layouts: int = 2) -> Path:
    """Ingest + annotate `images` procedural images (all train split) once; reused if present."""
    from pd_data.annotate import annotate_shard
    from pd_data.config import DataConfig
    from pd_data.ingest import ingest

    out = folder / f"n{images}-r{resolution}-l{layouts}"
    if (out / "done").exists():
        return out
    cfg = DataConfig(n_groups=images // (2 * layouts), layouts_per_group=layouts, resolution=resolution, shard_size=256,
                     split_fractions=(1.0, 0.0, 0.0))
    ingest(cfg, out / "img")
    for p in sorted((out / "img").glob("images-*.parquet")):
        annotate_shard(p, out / "ann" / p.name.replace("images", "annotations"), cfg.annotators)
    (out / "done").write_text("ok")
    return out


def _train(data, resolution: int, steps: int, workers: int, batch: int = 16) -> dict:
    from pd_data.tasks import TRAINING_TASKS
    from pd_model.base import build_tiny_base
    from pd_model.config import BaseModelConfig, TrainConfig
    from pd_model.train import ModelSpec, train_controlnet

    base = build_tiny_base(BaseModelConfig(block_out_channels=(32, 64, 64)), sorted(set(data.captions.values())), resolution)
    cfg = TrainConfig(steps=steps, batch_size=batch, learning_rate=5e-4, device="cpu", loader_workers=workers)
    stats: dict = {}
    train_controlnet(base, data, cfg, ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, steps), stats=stats)
    return stats


def rss_child(folder: str, resolution: int, steps: int, mode: str) -> None:
    """In a fresh process: `streamed` trains from the lazy split (the train stage's way); `in-memory`
    only decodes the whole split into RAM (the old way, `split_from_tables`). Prints the peak RSS."""
    from pd_data.dataset import load_split, split_from_tables
    from pd_data.shards import read_shards

    root, t0, out = Path(folder), clock(), {}
    if mode == "streamed":
        data = load_split(root / "img", root / "ann", "train")
        out["train_s"] = round(_train(data, resolution, steps, 0)["wall_s"], 1)
    else:
        data = split_from_tables(read_shards(root / "img", "images"), read_shards(root / "ann", "annotations"), "train")
    print(dumps({"images": len(data.arrays), f"peak_rss_mb_{mode}": round(peak_rss_mb(), 1), **out,
                 f"seconds_{mode}": round(clock() - t0, 1)}, indent=None))


def bench_rss(args) -> dict:
    cache = Path(args.cache)
    rows = []
    for n in args.sizes:
        t0 = clock()
        folder = make_data(cache, n, args.resolution)
        print(f"data n={n}: {clock() - t0:.0f} s", file=sys.stderr)
        row = {}
        for mode in ("streamed", "in-memory"):
            res = subprocess.run([sys.executable, __file__, "_rss_child", str(folder), str(args.resolution), str(args.steps),
                                  mode], capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise RuntimeError(res.stderr[-2000:])
            row |= json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(row, file=sys.stderr)
    for mode in ("streamed", "in-memory"):
        for r in rows:
            r[f"{mode}_vs_smallest"] = round(r[f"peak_rss_mb_{mode}"] / rows[0][f"peak_rss_mb_{mode}"], 3)
    return {"rss": rows, "resolution": args.resolution, "steps": args.steps}


def bench_wait(args) -> dict:
    from pd_data.dataset import load_split

    folder = make_data(Path(args.cache), 480, 32, layouts=3)  # the demo's 80 groups x 3 layouts x 2
    data = load_split(folder / "img", folder / "ann", "train")
    runs: dict[int, list[dict]] = {w: [] for w in args.workers}
    for r, w in schedule(args.workers, args.repeats):  # the training's own stats, not wall clocks around it
        s = _train(data, 32, args.steps, w)
        runs[w].append(s)
        print(f"repeat {r} workers {w}: wait {s['data_wait_s']:.2f} s of {s['wall_s']:.1f} s", file=sys.stderr)
    out = {}
    for w, rs in runs.items():
        out[f"loader_workers={w}"] = {
            "wait_fraction": round(median(x["data_wait_s"] / x["wall_s"] for x in rs), 4),
            # after the first batch, whose wait includes starting the worker processes
            "wait_fraction_after_first": round(median(
                (x["data_wait_s"] - x["first_batch_wait_s"]) / (x["wall_s"] - x["first_batch_wait_s"]) for x in rs), 4),
            "first_batch_wait_s": round(median(x["first_batch_wait_s"] for x in rs), 2),
            "step_s": round(median(x["wall_s"] / args.steps for x in rs), 3)}
    return {"wait": out, "steps": args.steps, "repeats": args.repeats, "batch": 16, "resolution": 32}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_rss_child":
        rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("rss", "wait", "annotate", "all"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="training steps (rss: 20, wait: 60)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "pd-bench-data"))
    ap.add_argument("--json", help="also write the results here")
    args, rest = ap.parse_known_args()
    out: dict = {}
    if args.what in ("rss", "all"):
        out |= bench_rss(argparse.Namespace(**{**vars(args), "steps": args.steps or 20}))
    if args.what in ("wait", "all"):
        out |= bench_wait(argparse.Namespace(**{**vars(args), "steps": args.steps or 60}))
    if args.what in ("annotate", "all"):
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_annotate.py"), *rest,
                              "--json", str(Path(args.cache) / "annotate.json")], cwd=ROOT)
        if res.returncode:
            return res.returncode
        out["annotate"] = json.loads((Path(args.cache) / "annotate.json").read_text())
    emit({**out, "machine": machine()}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
