"""Local multi-process jobs: the device check before any work, and the torchrun launch that training
(`pd_model.train_dist`) and generation (`pd_eval.generation`) share; training can go through
`accelerate launch` instead (`train.launcher`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def check_devices(section: str, device: str, processes: int) -> None:
    """Reject a process count this machine cannot place (one GPU each on CUDA) before any work;
    `section` names the config section of the settings (`train`, `eval`) in the error."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{section}.device='cuda' but no CUDA device is visible; set {section}.device=cpu (or auto)")
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if gpus and processes > gpus:
        raise ValueError(f"{section}.processes={processes} but this machine has {gpus} GPU(s), one per process; "
                         f"set {section}.processes<={gpus}, or {section}.device=cpu")


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without torch's CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpu_workers(gpu_workers: bool) -> None:
    """data.gpu_workers needs a GPU to give each worker."""
    if gpu_workers and visible_gpus() == 0:
        raise ValueError("data.gpu_workers=true but no CUDA device is visible; set data.gpu_workers=false "
                         "(and data.workers=N for N CPU processes)")


def worker_gpu(worker_name: object, gpus: int) -> int:
    """The GPU of a local Dask worker: its name is its index (0, 1, ...) in a local cluster of one worker
    per GPU, so worker i takes GPU i."""
    try:
        index = int(str(worker_name))
    except ValueError:
        raise ValueError(f"Dask worker {worker_name!r} has no index for a GPU: data.gpu_workers starts its own local "
                         f"cluster, whose workers are named 0, 1, ...") from None
    return index % gpus


def pin_dask_worker_gpu() -> int:
    """Make this Dask worker's GPU the current CUDA device (annotators placed on "cuda" land there)."""
    import torch
    from distributed import get_worker

    gpu = worker_gpu(get_worker().name, visible_gpus())
    torch.cuda.set_device(gpu)
    return gpu


def die_with_parent() -> None:
    """torchrun gets SIGTERM (and stops its workers) when the launching process dies, kill -9 included:
    no orphaned workers keep writing a folder whose stage lock is gone (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def torchrun_command(module: str, job: Path, processes: int) -> list[str]:
    """torchrun on this machine's `processes` local processes, each running `python -m module job`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", module, str(job)]


def accelerate_command(module: str, job: Path, processes: int, mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` of the same local job. `--multi_gpu` is accelerate's switch for starting
    the processes through torchrun, which it needs on a machine without GPUs too (there it would
    start one process otherwise); port 0 is a free one; `mixed_precision` only says what the job
    will use (the job's setting decides)."""
    many = ["--multi_gpu"] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *many, f"--num_processes={processes}", "--num_machines=1",
            f"--mixed_precision={mixed_precision}", "--dynamo_backend=no", "--main_process_port=0", "-m", module, str(job)]


def start(cmd: list[str], threads: int) -> subprocess.Popen:
    """`cmd` running with `threads` OpenMP threads per process; it stops when this process dies."""
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, preexec_fn=die_with_parent)


def start_torchrun(module: str, job: Path, processes: int, threads: int) -> tuple[subprocess.Popen, list[str]]:
    """The running torchrun (and its command, for the error that tells how to rerun it by hand), with
    `threads` OpenMP threads per process; it stops when this process dies."""
    cmd = torchrun_command(module, job, processes)
    return start(cmd, threads), cmd


def wait(proc: subprocess.Popen) -> int:
    """The exit code of `proc`; interrupted while waiting (Ctrl-C, a cancelled flow), it kills the workers first."""
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
