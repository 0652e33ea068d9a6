"""Data-parallel training rows: the training measurement on N processes through `accelerate launch`.

Each process (one GPU, NCCL) computes its 1/N share of the global batch and gradients are summed by
the pipeline's own DDP path (`pd_model.loop.Optimiser` through accelerate), as `train.processes` trains; rank 0
writes its rows. Samples/s count the global batch; the scaling efficiency is samples/s over N times
the one-process rate of the same global batch (the `training` section's eager rows).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gpucheck.record import Budget, log

SCRIPT = Path(__file__).resolve().parents[1] / "gpu_check.py"
START_S = 60.0  # launching N processes and building the models in each, before the first step


def processes(args, device: torch.device) -> int:
    if args.processes:
        return args.processes
    return torch.cuda.device_count() if device.type == "cuda" else 1


def launch_command(n: int, args, out: Path, seconds: float) -> list[str]:
    """`accelerate launch` of N workers of this script (one per GPU; on a CPU, torchrun's gloo: accelerate
    launches several CPU processes only through MPI)."""
    worker = [str(SCRIPT), "--worker", "train", "--worker-out", str(out), "--batches", args.batches,
              "--timed-steps", str(args.timed_steps), "--budget-s", str(int(seconds))] + (["--tiny"] if args.tiny else [])
    if args.tiny or not torch.cuda.is_available():
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *worker]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={n}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", *worker]


def measure(args, device: torch.device, budget, record) -> dict | None:
    """The multi_gpu section: None (with the reason) on one device; else rank 0's rows and the scaling."""
    n = processes(args, device)
    if n < 2:
        record.skip("multi_gpu", f"{n} {'GPU' if device.type == 'cuda' else 'device'} visible: nothing to spread over",
                    budget=False)
        return None
    if budget.left() < START_S:
        record.skip("multi_gpu", f"{budget.left():.0f} s left; starting {n} processes takes about {START_S:.0f} s")
        return None
    with tempfile.TemporaryDirectory(prefix="pd-gpu-check-multi-") as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = launch_command(n, args, out, budget.left() - START_S)
        log(f"multi_gpu: {' '.join(cmd)}")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        res = subprocess.run(cmd, env=env, timeout=max(1.0, budget.left()), capture_output=True, text=True)
        if res.returncode != 0 or not out.exists():
            raise RuntimeError(f"{n} processes exited {res.returncode}: {res.stderr[-1500:]}")
        done = json.loads(out.read_text())
    for skipped in done["not_measured"]:
        record.skip(f"multi_gpu: {skipped['what']}", skipped["why"], skipped["for_lack_of_time"])
    rows = done["rows"]
    single = {r["batch"]: r for r in ((record.data.get("training") or {}).get("rows") or []) if not r["compile"]}
    for r in rows:
        one = single.get(r["batch"])
        r["scaling_efficiency"] = round(r["samples_per_s"] / (n * one["samples_per_s"]), 3) if one else None
    return {"processes": n, "launcher": cmd[2], "backend": "nccl" if device.type == "cuda" else "gloo", "rows": rows}


class _Skips:
    """What a worker skipped, for rank 0's rows (the parent records the section)."""

    def __init__(self):
        self.data = {"not_measured": []}

    def skip(self, what: str, why: str, budget: bool = True) -> None:
        self.data["not_measured"].append({"what": what, "why": why, "for_lack_of_time": budget})


def worker(args) -> int:
    """One process of the launch: build the models on its GPU, measure, rank 0 writes the rows."""
    import torch.distributed as dist

    from gpucheck import models, training

    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        size = models.TINY if args.tiny else models.PAPER
        base = models.build_base(size, device)
        net = models.build_controlnet(base)
        skips, n = _Skips(), dist.get_world_size()
        batches = [int(x) for x in args.batches.split(",")]
        for b in (b for b in batches if b % n):
            skips.skip(f"batch {b}", f"it does not split into {n} equal shares", budget=False)
        rows = training.measure(base, net, size.resolution, device, [b for b in batches if b % n == 0], None,
                                Budget(args.budget_s), skips, {}, args.timed_steps)
        if dist.get_rank() == 0:
            args.worker_out.write_text(json.dumps({"rows": rows, "not_measured": skips.data["not_measured"]}))
    finally:
        dist.destroy_process_group()
    return 0
