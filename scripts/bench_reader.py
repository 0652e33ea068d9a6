"""The demo re-annotator's test-split scores per modality beside the mean map's, and its training time.

Builds the demo's procedural data (its data config: 80 groups x 3 layouts x 2 images at 32 px, split by
group 0.8 / 0.1 / 0.1) in a temporary folder with the ingest and annotate stages' own functions, trains
`pd_eval.reader.train_reader` on the train split and scores it on the test split (`reader_quality`).

    .venv/bin/python scripts/bench_reader.py                    # the demo's data, default reader
    .venv/bin/python scripts/bench_reader.py --steps 300 --width 8 --json
    .venv/bin/python scripts/bench_reader.py --save .pd/reader   # keep the trained reader

Measured (AMD EPYC, 2 cores, 360 train / 66 test images, width 16, batch 32): 1000 steps, test split,
reader vs mean map: depth RMSE 0.050 / 0.182, hed SSIM 0.906 / 0.091, scribble SSIM 0.927 / 0.076,
canny F1 0.896 / 0.000, seg dataset mIoU 0.769 / 0.232, normal angle 7.76 / 21.76 degrees: every
modality informative (600 steps too; at 300 with a squared error, seg and normal were not). A step is
~0.07 s on an idle machine (1000 steps in 81 s); with other jobs on the cores it took 4-7x longer.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import emit, machine, stopwatch


def build_splits(n_groups: int, layouts: int, resolution: int, root: Path):
    from pd_data.annotate import annotate_shard
    from pd_data.config import DataConfig
    from pd_data.dataset import load_split
    from pd_data.ingest import ingest

    cfg = DataConfig(n_groups=n_groups, layouts_per_group=layouts, resolution=resolution)
    ingest(cfg, root / "img")
    for p in sorted((root / "img").glob("images-*.parquet")):
        annotate_shard(p, root / "ann" / p.name.replace("images", "annotations"), cfg.annotators)
    return load_split(root / "img", root / "ann", "train"), load_split(root / "img", root / "ann", "test")


def main() -> None:
    from pd_data.procedural import SEG_PALETTE
    from pd_eval.reader import INFORMATIVE_FRACTION, mean_maps, reader_quality, split_pairs, train_reader

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=80, help="data.n_groups (demo: 80)")
    ap.add_argument("--layouts", type=int, default=3, help="data.layouts_per_group (demo: 3)")
    ap.add_argument("--resolution", type=int, default=32, help="data.resolution (demo: 32)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="save the trained reader to this folder")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        train, test = build_splits(args.groups, args.layouts, args.resolution, Path(tmp))
        pairs = split_pairs(train)
        with stopwatch() as lap:
            reader = train_reader(pairs, args.steps, args.seed, SEG_PALETTE, args.width, args.batch_size, args.lr)
        seconds = lap.seconds
        held = split_pairs(test)
        images = next(iter(held.values()))[0]
        quality = reader_quality(reader, images, {m: maps for m, (_, maps) in held.items()}, mean_maps(train, tuple(held)))
    if args.save:
        reader.save(args.save)
    result = {"reader": reader.id, "train_images": len(next(iter(pairs.values()))[0]), "test_images": len(images),
              "steps": args.steps, "width": args.width, "batch_size": args.batch_size, "seed": args.seed,
              "train_seconds": round(seconds, 1), "informative_fraction": INFORMATIVE_FRACTION, "modalities": quality}
    if args.json:
        emit({**result, "machine": machine()})
        return
    print(f"{result['reader']}: {result['train_images']} train / {result['test_images']} test images, "
          f"{args.steps} steps, width {args.width}, trained in {seconds:.1f} s")
    print(f"{'modality':<9} {'metric':<18} {'reader':>8} {'mean map':>9} {'ceiling':>8}  informative")
    for m, q in quality.items():
        print(f"{m:<9} {q['metric']:<18} {q['reader']:>8.4f} {q['mean_map']:>9.4f} {q['ceiling']:>8.1f}  {q['informative']}")
    print(f"informative: gap to the ceiling at most {INFORMATIVE_FRACTION} x the mean map's")


if __name__ == "__main__":
    main()
