"""One-call GPU check: what the paper profile's stages cost on this machine, as one JSON object.

    bash scripts/gpu_check.sh                  # on the GPU machine: installs wheels/, runs this, saves $OUT/gpu_check.json
    python scripts/gpu_check.py --tiny         # the same code paths on the CPU with tiny models, ~30 s
    python scripts/gpu_check.py --budget-s 300 --sections machine,training

Sections (each guarded: a failure is recorded under `errors` and the next one runs):
machine (devices, versions, a measured bf16 matmul rate); training (the paper's step, SD-1.5-sized
UNet + Prompt Diffusion ControlNet at 256 px under bf16 autocast, rows per batch x torch.compile off
and on: samples/s, peak memory, counted GFLOP per step, MFU); evaluation (samples/s of the evaluate
stage's generation at DDIM 20 and 100 with text guidance, and the paper protocol's whole cost);
annotators (HED, DPT depth, UperNet seg images/s at two sizes); e2e (a short paper-profile run,
ingest to stored metrics, on tiny SD-format weights made on the spot, without Prefect); multi_gpu
(the training rows through `accelerate launch` when more than one GPU is visible). Nothing is read
from the network and no weights are needed: every network is randomly initialised.

`--budget-s` (default 420) is shared out among the sections, each skipping what would not fit (listed
in `not_measured` with the reason); a watchdog prints the JSON as it stands (complete=false) at
`--deadline-s` (default budget + 40 s) whatever runs then, so the JSON always comes out before 8 minutes.
Progress goes to stderr, the JSON to stdout (and to `--json-out`, rewritten after every section).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpucheck

from gpucheck.record import Budget, Record, log, start_watchdog  # noqa: E402 - after the paths

# Each section's weight in the budget; what a section leaves unused goes to those after it.
WEIGHTS = {"machine": 0.04, "training": 0.17, "evaluation": 0.17, "annotators": 0.12, "training_compiled": 0.25,
           "e2e": 0.15, "multi_gpu": 0.10}
FULL = {"batches": "8,32", "compile_batches": None, "eval_steps": "20,100", "eval_batches": "8,32",
        "annotator_sides": "256,512", "annotator_images": 16, "compile_backend": "inductor", "timed_steps": 20,
        "fid_dim": 2048}
# Tiny: the same calls, at sizes a 2-core CPU runs in seconds; one batch compiled, through dynamo with the
# eager backend (Inductor's C++ build alone takes minutes there); FID at the offline features' 128-d.
TINY = {"batches": "1,2", "compile_batches": "1", "eval_steps": "1,2", "eval_batches": "1,2",
        "annotator_sides": "32,64", "annotator_images": 1, "compile_backend": "eager", "timed_steps": 3,
        "fid_dim": 128}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the same code paths in ~30 s")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds shared out among the sections")
    ap.add_argument("--deadline-s", type=float, default=None, help="the watchdog's hard deadline (default budget + 40)")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON here (after every section)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA unless --tiny")
    ap.add_argument("--sections", default=",".join(WEIGHTS), help=f"a subset of {','.join(WEIGHTS)}")
    ap.add_argument("--batches", default=None, help="training global batches (default 8,32; tiny 1,2)")
    ap.add_argument("--compile-batches", default=None, help="batches timed compiled (default --batches; tiny 1)")
    ap.add_argument("--timed-steps", type=int, default=None, help="at most this many timed steps a row (20; tiny 3)")
    ap.add_argument("--fid-dim", type=int, default=None, help="feature width of the timed FID (2048; tiny 128)")
    ap.add_argument("--eval-steps", default=None, help="DDIM step counts (default 20,100; tiny 1,2)")
    ap.add_argument("--eval-batches", default=None, help="generation batches (default 8,32; tiny 1,2)")
    ap.add_argument("--annotator-sides", default=None, help="image sides in px (default 256,512; tiny 32,64)")
    ap.add_argument("--annotator-images", type=int, default=None, help="images timed per annotator and side")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; tiny eager)")
    ap.add_argument("--processes", type=int, default=None,
                    help="processes of the multi_gpu section (default: every visible GPU when more than one)")
    ap.add_argument("--worker", choices=["train"], default=None, help=argparse.SUPPRESS)  # one accelerate process
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile_batches = args.compile_batches or args.batches
    unknown = set(args.sections.split(",")) - set(WEIGHTS)
    if unknown:
        ap.error(f"--sections {args.sections}: unknown {sorted(unknown)}; choose from {','.join(WEIGHTS)}")
    args.deadline_s = args.deadline_s or args.budget_s + 40
    return args


def pick_device(args):
    import torch

    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(args.device)


class Models:
    """The base and ControlNet of training and evaluation, built once on first use."""

    def __init__(self, args, device):
        self.args, self.device, self._built = args, device, None
        self.flops: dict[int, float] = {}  # per global batch, counted by the eager rows, read by the compiled ones

    def get(self):
        if self._built is None:
            from gpucheck import models

            size = models.TINY if self.args.tiny else models.PAPER
            log(f"building the {size.name}-size models on {self.device}")
            base = models.build_base(size, self.device)
            self._built = (size, base, models.build_controlnet(base))
        return self._built


def section_training(rec: Record, args, device, models: Models, backend: str | None) -> None:
    from gpucheck import machine, training
    from gpucheck.models import describe
    from pd_model.precision import describe as precision, resolve

    size, base, net = models.get()
    batches = ints(args.compile_batches if backend else args.batches)
    if backend and batches != ints(args.batches):
        rec.skip(f"training compiled at batches {sorted(set(ints(args.batches)) - set(batches))}",
                 f"--compile-batches {args.compile_batches}", budget=False)
    rows = training.measure(base, net, size.resolution, device, batches, backend, rec.budget, rec, models.flops,
                            args.timed_steps)
    datasheet, measured = machine.peak_of(rec.data["machine"])
    rows = [training.with_utilisation(r, datasheet, measured) for r in rows]
    t = rec.data["training"] or {"model": describe(base, net), "size": size.name, "resolution": size.resolution,
                                 "latent_side": size.resolution // 8,
                                 "precision": f"{precision(resolve('auto', device))} (train.mixed_precision=auto)",
                                 "trained": "Prompt Diffusion ControlNet (UNet and VAE frozen)", "rows": [],
                                 "flops": "torch.utils.flop_counter over one eager step, forward + backward"}
    t["rows"] += rows
    rec.data["training"] = t


def section_evaluation(rec: Record, args, device, models: Models) -> None:
    from gpucheck import sampling

    size, base, net = models.get()
    rec.data["evaluation"] = sampling.measure(base, net, size.resolution, device, ints(args.eval_steps),
                                              ints(args.eval_batches), rec.budget, rec, args.fid_dim)


def section_annotators(rec: Record, args, device) -> None:
    import tempfile

    from gpucheck import annotators

    with tempfile.TemporaryDirectory(prefix="pd-gpu-check-annotators-") as tmp:
        log("writing random annotator weights")
        weights = annotators.write_weights(Path(tmp), args.tiny)
        rec.data["annotators"] = annotators.measure(weights, ints(args.annotator_sides), args.annotator_images,
                                                    rec.budget, rec)


def section_e2e(rec: Record, args, device) -> None:
    from gpucheck import e2e

    rec.data["e2e"] = e2e.run(args.tiny, device, rec.budget, rec)


def section_multi(rec: Record, args, device) -> None:
    from gpucheck import multi

    rec.data["multi_gpu"] = multi.measure(args, device, rec.budget, rec)


def run_sections(rec: Record, args, device) -> None:
    from gpucheck.multi import processes

    models = Models(args, device)
    chosen = [s for s in WEIGHTS if s in args.sections.split(",")]
    weights = WEIGHTS | ({"multi_gpu": 0.0} if processes(args, device) < 2 else {})  # one device: nothing to reserve
    calls = {"machine": lambda: rec.data.__setitem__("machine", machine_section(device, args.tiny)),
             "training": lambda: section_training(rec, args, device, models, None),
             "evaluation": lambda: section_evaluation(rec, args, device, models),
             "annotators": lambda: section_annotators(rec, args, device),
             "e2e": lambda: section_e2e(rec, args, device),
             "training_compiled": lambda: section_training(rec, args, device, models, args.compile_backend),
             "multi_gpu": lambda: section_multi(rec, args, device)}
    for i, name in enumerate(chosen):
        share = weights[name] / (sum(weights[s] for s in chosen[i:]) or 1.0)
        with rec.section(name, rec.budget.total_left() * share):
            calls[name]()
    for name in sorted(set(WEIGHTS) - set(chosen)):
        rec.skip(f"section {name}", "not asked for (--sections)", budget=False)


def machine_section(device, tiny: bool) -> dict:
    from gpucheck import machine

    return machine.describe(device, tiny)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from gpucheck import multi

        return multi.worker(args)
    rec = Record("tiny" if args.tiny else "full", Budget(args.budget_s), args.json_out)
    start_watchdog(rec, args.deadline_s)
    try:
        device = pick_device(args)
    except (ImportError, SystemExit) as e:  # no torch, or no GPU where one was asked for: still the JSON
        rec.data["errors"]["startup"] = f"{type(e).__name__}: {e}"
        rec.emit(False)
        return 1
    if args.tiny and device.type == "cpu":
        import torch

        torch.set_num_threads(1)  # tiny ops gain nothing from more; OpenMP's spinning threads lose a lot on a busy CPU
    log(f"device {device}, budget {args.budget_s:.0f} s, deadline {args.deadline_s:.0f} s")
    with contextlib.redirect_stdout(sys.stderr):  # the stages' progress lines: stdout is the JSON's alone
        run_sections(rec, args, device)
    complete = not rec.data["errors"] and not any(n["for_lack_of_time"] for n in rec.data["not_measured"])
    rec.emit(complete)
    return 0 if complete else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched: no weights, no hub kernels
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    sys.exit(main())
