"""Ingest + annotation throughput (images/s) of procedural data with 1 and 2 worker processes.

    .venv/bin/python scripts/bench_ingest.py [--images 2000] [--resolution 64] [--repeats 3]

Each repeat runs the ingest and annotate flows from an empty state directory, alternating the
worker counts so that both see the same machine load; prints per-run times and medians.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import emit, machine, median, ratio, schedule, stopwatch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=100)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pd-bench-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.pop("PREFECT_API_URL", None)
    (tmp / "prefect").mkdir()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.stages import annotate_flow, ingest_flow

    results: dict[int, dict[str, list[float]]] = {w: {"ingest_s": [], "annotate_s": [], "total_s": []} for w in (1, 2)}
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for r, workers in schedule((1, 2), args.repeats):  # an empty state directory every run
            over = {"data": {"n_groups": args.images // 4, "resolution": args.resolution,  # 2 layouts x 2 twins
                             "shard_size": args.shard_size, "workers": workers}}
            state = str(tmp / f"r{r}-w{workers}")
            with stopwatch() as ingest:
                ingest_flow("smoke", over, state)
            with stopwatch() as annotate:
                annotate_flow("smoke", over, state, upstream=False)
            for key, s in (("ingest_s", ingest.seconds), ("annotate_s", annotate.seconds),
                           ("total_s", ingest.seconds + annotate.seconds)):
                results[workers][key].append(s)
            print(f"repeat {r} workers {workers}: ingest {ingest.seconds:.1f} s, annotate {annotate.seconds:.1f} s",
                  file=sys.stderr)
    summary = {}
    for w, runs in results.items():
        summary[f"workers={w}"] = {**{k: round(median(v), 2) for k, v in runs.items()},
                                   "images_per_s": round(args.images / median(runs["total_s"]), 1)}
    summary["speedup_2_over_1"] = round(ratio(results[1]["total_s"], results[2]["total_s"]), 2)
    emit({**summary, "config": vars(args), "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
