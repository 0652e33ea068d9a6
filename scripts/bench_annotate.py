"""Annotation speed: median images/s per backend and modality, on this CPU (and on CUDA when present).

Every network is built with its real architecture and *random weights* (speed does not depend on
the weight values), so nothing is read from data.annotator_weights and nothing is downloaded:
controlnet-aux's HED, MiDaS dpt-hybrid and NormalBae as ControlNet 1.1 ships them, and the transformers
UperNet (openmmlab/upernet-convnext-small: ConvNeXt-S, 512 px input) and DPT-hybrid
(Intel/dpt-hybrid-midas: 384 px input). The transformers annotators resize every image to that fixed
input, so their speed barely depends on --res; they run through `batch(images)`. The controlnet-aux
detectors run at the input's size rounded up to 64 px, one image per call as pd_data.annotate calls
them. The procedural annotator renders every map of its scene per call.

A number is images / wall second over `--images` images: the median of up to `--repeats` runs after
one warm-up run, as many as fit in `--budget` seconds; a warm-up run longer than half the budget (a
big network on the CPU, where first-call overheads are small beside it) is itself the one run.

    .venv/bin/python scripts/bench_annotate.py                 # 256 and 64 px: ~1.5 min on 2 cores
    .venv/bin/python scripts/bench_annotate.py --quick         # 64 px, one image, one run (~40 s on 2
                                                               # cores: a UperNet or DPT image is ~8 s)
    .venv/bin/python scripts/bench_annotate.py --quick --only procedural controlnet_aux.canny  # seconds
    .venv/bin/python scripts/bench_annotate.py --res 512 --only transformers --json out.json
"""
from __future__ import annotations

import argparse
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import device_sync, machine, median, stopwatch, write_json

# (backend, modality) -> builder(device) -> annotator; networks at random init, their real sizes.


def _procedural(device):
    from pd_data.annotate import ProceduralAnnotator

    return ProceduralAnnotator("depth")


def _aux(modality, network=None):
    def build(device):
        from pd_data.annotators_ext import ControlNetAuxAnnotator

        if network is None:
            return ControlNetAuxAnnotator.from_pretrained(modality)
        return ControlNetAuxAnnotator.from_model(modality, network().eval())
    return build


def _hed():
    from controlnet_aux.hed import ControlNetHED_Apache2

    return ControlNetHED_Apache2()


def _midas():
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    return DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)


def _normalbae():
    from controlnet_aux.normalbae.nets.NNET import NNET

    return NNET(types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet",
                                      sampling_ratio=0.4, importance_ratio=0.7))


def _seg(device):
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    from pd_data.annotators_ext import UperNetSegAnnotator

    backbone = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=512, auxiliary_in_channels=384, num_labels=150)
    return UperNetSegAnnotator(UperNetForSemanticSegmentation(config),
                               SegformerImageProcessor(size={"height": 512, "width": 512}), device=device)


def _dpt(device):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from pd_data.annotators_ext import DPTDepthAnnotator

    config = DPTConfig(is_hybrid=True, neck_hidden_sizes=[256, 512, 768, 768], reassemble_factors=[1, 1, 1, 0.5],
                       backbone_featmap_shape=[1, 1024, 24, 24])  # Intel/dpt-hybrid-midas
    return DPTDepthAnnotator(DPTForDepthEstimation(config), DPTImageProcessor(size={"height": 384, "width": 384}),
                             device=device)


CASES = {  # (backend, modality) -> (builder, runs on CUDA too)
    ("procedural", "all maps"): (_procedural, False),
    ("controlnet_aux", "canny"): (_aux("canny"), False),
    ("controlnet_aux", "hed"): (_aux("hed", _hed), False),
    ("controlnet_aux", "depth"): (_aux("depth", _midas), False),
    ("controlnet_aux", "normal"): (_aux("normal", _normalbae), False),
    ("transformers", "seg"): (_seg, True),
    ("transformers", "depth"): (_dpt, True),
}


def _inputs(res: int, n: int) -> list[tuple[np.ndarray, dict]]:
    """n procedural scenes at res px, each with the provenance the procedural annotator reads."""
    from pd_data import procedural

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        scene = procedural.sample_scene(rng)
        out.append((procedural.render(scene, res, i)["image"], {"scene": scene, "texture_seed": i}))
    return out


def images_per_second(annotator, inputs, repeats: int, budget: float, warmup: bool,
                      device: str = "cpu") -> tuple[float, int]:
    """(median images/s, runs timed): each run maps all inputs (batched where the annotator can batch)."""
    def run() -> float:
        with stopwatch(device_sync(device)) as lap:
            if hasattr(annotator, "batch"):
                annotator.batch([img for img, _ in inputs])
            else:
                for img, prov in inputs:
                    annotator(img, prov)
        return lap.seconds

    t = run() if warmup else 0.0
    if t > budget / 2:
        times = [t]
    else:
        times = [run()]
        while len(times) < repeats and sum(times) + times[0] <= budget:
            times.append(run())
    return len(inputs) / median(times), len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, nargs="+", default=[256, 64], help="input sizes (square, px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=None,
                    help="images per run (default: 1 per network on the CPU, 16 on CUDA, 16 weight-free)")
    ap.add_argument("--budget", type=float, default=5.0, help="seconds of timed runs per row (at least one run)")
    ap.add_argument("--only", nargs="+", default=None, help="backends or backend.modality to run, e.g. transformers")
    ap.add_argument("--quick", action="store_true", help="64 px, one run of one image, no warm-up")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    res, repeats = ([64], 1) if args.quick else (args.res, args.repeats)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    warnings.simplefilter("ignore")  # controlnet-aux's and timm's import-time notices
    rows = []
    for (backend, modality), (build, on_cuda) in CASES.items():
        if args.only and backend not in args.only and f"{backend}.{modality}" not in args.only:
            continue
        weight_free = backend == "procedural" or modality == "canny"
        for device in devices if on_cuda else ["cpu"]:
            row = {"backend": backend, "modality": modality, "device": device,
                   "weights": "none" if weight_free else "random (real architecture)"}
            try:
                with stopwatch() as lap:
                    annotator = build(device)
                row["build_s"] = round(lap.seconds, 1)
            except ImportError as e:  # e.g. no controlnet-aux on this machine
                rows.append({**row, "skipped": f"{type(e).__name__}: {e}"})
                continue
            n = args.images or (1 if args.quick else 16 if weight_free or device == "cuda" else 1)
            for r in res:
                ips, runs = images_per_second(annotator, _inputs(r, n), repeats, args.budget, not args.quick, device)
                rows.append({**row, "res": r, "images": n, "runs": runs, "images_per_s": round(ips, 2)})
            del annotator
    gpu = f", {torch.cuda.get_device_name()}" if "cuda" in devices else ", no CUDA"
    print(f"# annotation images/s (median of up to {repeats} runs); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads{gpu}")
    print(f"{'backend':<15}{'modality':<10}{'device':<7}{'res':>5}{'img/s':>10}{'runs':>5}{'build s':>9}  weights")
    for row in rows:
        if "skipped" in row:
            print(f"{row['backend']:<15}{row['modality']:<10}{row['device']:<7}  skipped: {row['skipped']}")
        else:
            print(f"{row['backend']:<15}{row['modality']:<10}{row['device']:<7}{row['res']:>5}"
                  f"{row['images_per_s']:>10.2f}{row['runs']:>5}{row['build_s']:>9.1f}  {row['weights']}")
    if args.json:
        write_json(args.json, {"meta": {**machine(), "repeats": repeats}, "rows": rows})


if __name__ == "__main__":
    main()
