"""How well does the tiny base draw held-out captions? Train it under several settings, score each.

    .venv/bin/python scripts/bench_base.py                       # demo data, plain vs demo settings
    .venv/bin/python scripts/bench_base.py --variants plain,minsnr,minsnr-te,demo --steps 900
    .venv/bin/python scripts/bench_base.py --variants "demo;lr2e3:learning_rate=0.002;long:train_steps=1800"
    .venv/bin/python scripts/bench_base.py --variants "cached:load=.pd/models/base/KEY"   # score a trained base
    .venv/bin/python scripts/bench_base.py --variants "long:train_steps=3600" --score-at 900,1800,2700  # one run, four scores
    .venv/bin/python scripts/bench_base.py --variants "cached:load=.pd/models/base/KEY" --from-split train  # fit, not generalisation

Each variant trains the demo base (same data, seed and steps) through `pd_model.train_base.train_base`,
samples the first N held-out captions (default 96; the demo's held-out split has 54), DDIM 20 steps,
guidance 3 unless told, one seed per caption, and reports the FID of those samples against the
images of the same captions with the offline `random-conv-v1` features, plus the training time.
`--from-split train` samples training captions against their training images instead: how well
the base fits its own data. Grids, each sample beside the image of its
caption, go to `--out`. On 2 cores run one command at a time, or two with OMP_NUM_THREADS=1 each
(together about 28% more throughput than one after the other; each alone is slower).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.profiles import load_profile, parse_override, split_overrides
from pd_data.annotate import annotate_shard
from pd_data.dataset import SplitData, load_split
from pd_data.ingest import ingest
from pd_eval.features import RandomConvFeatures
from pd_model.visuals import caption_grid
from pd_model.base import build_tiny_base, load_base
from pd_model.pipeline import PromptDiffusionPipeline, uint8_images
from pd_model.train_base import train_base
from scripts.harness import clock

VARIANTS = {
    "plain": {"snr_gamma": 0.0, "train_text_encoder": False, "map_fraction": 0.0},
    "minsnr": {"snr_gamma": 5.0, "train_text_encoder": False, "map_fraction": 0.0},
    "minsnr-te": {"snr_gamma": 5.0, "train_text_encoder": True, "map_fraction": 0.0},
    "demo": {},  # the demo profile as it is
}


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """Presets ("plain,demo") or custom variants ("lr2e3:learning_rate=0.002;long:train_steps=1800")."""
    if ":" not in text:
        return [(name, VARIANTS[name]) for name in text.split(",")]
    out = []
    for item in filter(None, text.split(";")):
        name, _, rest = item.partition(":")
        update = {}
        for kv in split_overrides(rest):  # base.* keys without the section, and load=
            update |= parse_override(f"base.{kv}")["base"]
        out.append((name, {**VARIANTS.get(name, {}), **update}))
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="plain,demo",
                    help="comma-separated presets, or ';'-separated NAME:key=value,... (base.* keys on top of the demo profile)")
    ap.add_argument("--steps", type=int, default=None, help="base steps (default: the demo profile's)")
    ap.add_argument("--captions", type=int, default=96, help="at most this many (the demo's held-out split has 54)")
    ap.add_argument("--from-split", choices=["held-out", "train"], default="held-out",
                    help="sample held-out captions (generalisation) or training ones (how well the base fits its data)")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale of the samples")
    ap.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the samples")
    ap.add_argument("--out", default="bench-base")
    ap.add_argument("--score-at", default="", help="also score at these steps of each run, e.g. 900,1800,2700 "
                    "(EMA weights; training time excludes the scoring)")
    ap.add_argument("--save", default=None, help="save each trained base to SAVE/NAME (diffusers layout; load= reads it)")
    return ap.parse_args()


def demo_splits(prof, root: Path) -> tuple[SplitData, SplitData]:
    """(train, held-out) of the demo data, ingested and annotated under `root`; the splits read their
    Parquet shards lazily, so `root` must outlive them."""
    ingest(prof.data, root / "img")
    for p in sorted((root / "img").glob("images-*.parquet")):
        annotate_shard(p, root / "ann" / p.name.replace("images", "annotations"), prof.data.annotators)
    return load_split(root / "img", root / "ann", "train"), load_split(root / "img", root / "ann", prof.prompts.split)


class Scorer:
    """Samples the first `n` captions of `scored` with a base, one seed per caption; saves a grid of
    samples beside their captions' images and prints the FID against those images as a table row."""

    def __init__(self, scored: SplitData, n: int, sample_steps: int, guidance: float, resolution: int, out: Path):
        self.scored, self.out = scored, out
        self.sample_steps, self.guidance, self.resolution = sample_steps, guidance, resolution
        self.ids = sorted(scored.captions)[:n]
        self.captions = [scored.captions[i] for i in self.ids]
        self.features = RandomConvFeatures()
        # The images of the sampled captions: as many real images as samples, on either split (FID is biased by set size).
        self.real = self.feats(np.stack([scored.arrays[i]["image"] for i in self.ids]))

    def feats(self, a: np.ndarray) -> np.ndarray:
        return self.features(torch.from_numpy(a).permute(0, 3, 1, 2).float()).numpy()

    def __call__(self, base, name: str, steps: str, seconds: float) -> None:
        pipe = PromptDiffusionPipeline.from_parts(base, None, "ddim")
        pipe.set_progress_bar_config(disable=True)
        captions = self.captions
        images = uint8_images(pipe(captions, num_inference_steps=self.sample_steps, guidance_scale=self.guidance,
                                   generator=[torch.Generator().manual_seed(i) for i in range(len(captions))],
                                   height=self.resolution, width=self.resolution).images)
        # Each sample beside the image its caption came from.
        shown = range(min(8, len(images)))
        pairs = [a for k in shown for a in (images[k], self.scored.arrays[self.ids[k]]["image"])]
        labels = [t for k in shown for t in (captions[k], "its image")]
        caption_grid(np.stack(pairs), labels).save(self.out / f"{name}.png")
        value = float(cleanfid.fid_from_feats(self.feats(images), self.real))
        print(f"| {name} | {steps} | {seconds:.0f} | {value:.3f} |", flush=True)


def run_variant(name: str, update: dict, args: argparse.Namespace, prof, train: SplitData, score: Scorer) -> None:
    """Train one variant's base (or load it, given load=), scored at each --score-at step along the
    run and at its end; the training time leaves the scoring out."""
    score_at = {int(s) for s in args.score_at.split(",") if s}
    saved = update.pop("load", None)
    cfg = prof.base.model_validate({**prof.base.model_dump(), **update, **({"train_steps": args.steps} if args.steps else {})})
    t0 = clock()
    scoring = [0.0]  # seconds spent scoring along the run, kept out of the training time
    if saved:  # a base the pipeline already trained (e.g. .pd/models/base/KEY): score it as it is
        base = load_base(saved)
    else:
        torch.manual_seed(cfg.seed)
        base = build_tiny_base(cfg, sorted(set(train.captions.values())), prof.data.resolution)

        def along(step: int) -> None:
            if step in score_at and step != cfg.train_steps:
                s0 = clock()
                base.unet.eval()
                with torch.no_grad():
                    score(base, f"{name}@{step}", str(step), s0 - t0 - scoring[0])
                base.unet.train()
                scoring[0] += clock() - s0

        every = (math.gcd(*score_at), along) if score_at else None
        train_base(base, train, cfg, every=every)
    seconds = clock() - t0 - scoring[0]
    if args.save and not saved:
        base.save(Path(args.save) / name)
    score(base, name, "saved" if saved else str(cfg.train_steps), seconds)


def main() -> None:
    args = parse_args()
    prof = load_profile("demo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # until the last score: the splits read from it
        train, test = demo_splits(prof, Path(tmp))
        scored = test if args.from_split == "held-out" else train
        score = Scorer(scored, args.captions, args.sample_steps, args.guidance, prof.data.resolution, out)
        print(f"| variant | steps | train s | FID (random-conv-v1) vs {args.from_split} images |\n|---|---|---|---|")
        for name, update in parse_variants(args.variants):
            run_variant(name, update, args, prof, train, score)


if __name__ == "__main__":
    main()
