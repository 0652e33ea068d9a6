"""Where the demo's bf16 training step loses time outside the arithmetic, and what two candidate fixes would buy.

    .venv/bin/python scripts/bench_step_leaks.py                     # batch 8, one thread, bf16
    .venv/bin/python scripts/bench_step_leaks.py --batch 16 --threads 2 --repeats 6

The step is `scripts/bench_train.py`'s (the pipeline's `Optimiser.step` at the demo shape, laid out
by `fast_layout`). Three measurements, each printed in one JSON object:

- copies: the time of every copy, clone and dtype conversion in one step, timed at the dispatcher
  (a TorchDispatchMode around each op) rather than by torch.profiler, whose per-event overhead
  makes thousands of small copies look several times costlier than they are;
- shortcut: diffusers' `ResnetBlock2D` makes the shortcut convolution's input contiguous in
  training mode, which under channels_last weights is an NHWC -> NCHW transpose and, inside the
  convolution, one back. The variant skips it (the block's own `training` flag off for its
  forward only; its children, dropout included, keep theirs). Both variants alternate, medians;
- page faults: minor faults per step, and the step time in a child process whose glibc keeps
  freed memory (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ large), the two
  processes run one after the other.

Neither fix is in the pipeline: at the demo size they were a few percent each (docs/benchmarks.md, "Training
speed").
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

if not __package__:  # run as a file: import from the repository root, as `python -m scripts.NAME` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import clock, dumps, emit, interleave, machine, median, ratio, stopwatch

KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36), "MALLOC_TOP_PAD_": str(2**30)}


def make_step(batch: int, precision: str, skip_shortcut_contiguous: bool = False):
    from diffusers.models.resnet import ResnetBlock2D

    from scripts.bench_train import Step, build_models

    base, cn, trained, in_res, text = build_models(False, 32)
    step = Step(base, cn, trained, batch, in_res, text, 32, precision, "cpu")
    if skip_shortcut_contiguous:
        def off(mod, _args):
            object.__setattr__(mod, "training", False)  # the block only: not .eval(), which would recurse

        def on(mod, _args, _out):
            object.__setattr__(mod, "training", True)

        for m in [*cn.modules(), *base.unet.modules()]:
            if isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None:
                m.register_forward_pre_hook(off)
                m.register_forward_hook(on)
    for _ in range(3):  # warm-up: oneDNN primitives, allocator
        step()
    return step


def copies(step) -> dict:
    from torch.utils._python_dispatch import TorchDispatchMode

    spent, calls = collections.Counter(), collections.Counter()

    class Clock(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = clock()
            out = func(*args, **(kwargs or {}))
            name = str(func)
            spent[name] += clock() - t0
            calls[name] += 1
            return out

    with stopwatch() as lap, Clock():
        step()
    total = lap.seconds
    moved = {k: v for k, v in spent.items() if any(w in k for w in ("copy", "clone", "contiguous"))}
    return {"step_s_under_dispatch_clock": round(total, 4), "ops_s": round(sum(spent.values()), 4),
            "copies_s": round(sum(moved.values()), 4), "copy_calls": sum(calls[k] for k in moved),
            "by_op_s": {k: round(v, 4) for k, v in sorted(moved.items(), key=lambda kv: -kv[1])}}


def faults_child(args) -> dict:
    step = make_step(args.batch, args.precision)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = interleave({"step": step}, args.steps * args.repeats, warmup=0)["step"]  # warmed up by make_step
    return {"step_s_median": round(median(ts), 4),
            "minor_faults_per_step": round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(ts))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--repeats", type=int, default=4, help="alternating rounds")
    ap.add_argument("--faults-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.faults_child:
        print(dumps(faults_child(args), indent=None))
        return 0

    plain, skip = make_step(args.batch, args.precision), make_step(args.batch, args.precision, True)
    t = interleave({"plain": plain, "skip": skip}, args.repeats, warmup=0, per_round=args.steps)  # warmed up by make_step
    result = {"config": vars(args), "machine": machine(), "copies": copies(plain)}
    result["shortcut"] = {"step_s_median": round(median(t["plain"]), 4),
                          "skipping_contiguous_s_median": round(median(t["skip"]), 4),
                          "speedup": round(ratio(t["plain"], t["skip"]), 3)}
    del plain, skip
    child = [sys.executable, __file__, "--faults-child", *sys.argv[1:]]
    runs = {name: json.loads(subprocess.run(child, env={**os.environ, **extra}, check=True, capture_output=True,
                                            text=True).stdout.strip().splitlines()[-1])
            for name, extra in (("glibc_default", {}), ("keep_freed_memory", KEEP_FREED))}
    runs["speedup"] = round(runs["glibc_default"]["step_s_median"] / runs["keep_freed_memory"]["step_s_median"], 3)
    result["page_faults"] = runs
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
