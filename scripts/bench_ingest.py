"""Ingest + annotation throughput (images/s) of procedural data with 1 and 2 worker processes.

    .venv/bin/python scripts/bench_ingest.py [--images 2000] [--resolution 64] [--repeats 3]

Each repeat runs the ingest and annotate flows from an empty state directory, alternating the
worker counts so that both see the same machine load; prints per-run times and medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


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

    results: dict[int, list[dict]] = {1: [], 2: []}
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for r in range(args.repeats):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                over = {"data": {"n_groups": args.images // 4, "resolution": args.resolution,  # 2 layouts x 2 twins
                                 "shard_size": args.shard_size, "workers": workers}}
                state = str(tmp / f"r{r}-w{workers}")
                t0 = time.perf_counter()
                ingest_flow("smoke", over, state)
                t1 = time.perf_counter()
                annotate_flow("smoke", over, state, upstream=False)
                t2 = time.perf_counter()
                results[workers].append({"ingest_s": t1 - t0, "annotate_s": t2 - t1, "total_s": t2 - t0})
                print(f"repeat {r} workers {workers}: ingest {t1 - t0:.1f} s, annotate {t2 - t1:.1f} s", file=sys.stderr)
    summary = {}
    for w, runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in ("ingest_s", "annotate_s", "total_s")}
        summary[f"workers={w}"] = {**{k: round(v, 2) for k, v in med.items()},
                                   "images_per_s": round(args.images / med["total_s"], 1)}
    summary["speedup_2_over_1"] = round(summary["workers=1"]["total_s"] / summary["workers=2"]["total_s"], 2)
    summary["config"] = vars(args)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
