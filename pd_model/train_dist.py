"""One ControlNet training job, in this process or data-parallel over several (torch.distributed).

    torchrun --nproc_per_node=N -m pd_model.train_dist JOB.json
    accelerate launch --multi_gpu --num_processes N -m pd_model.train_dist JOB.json

The two run the same job (`--multi_gpu` is accelerate's switch for starting N processes, which it
needs on a machine without GPUs too; on one with N GPUs it sets it itself), and the job's own
settings decide everything that changes weights: a launcher's --mixed_precision, gradient
accumulation or dynamo is not used. Several machines: each runs the same command with its
launcher's own options (torchrun's --nnodes/--node_rank/--rdzv_*, accelerate's
--num_machines/--machine_rank/--main_process_ip/--main_process_port), which pass through to it.

The train stage (and the retrain flow, for its candidate) writes JOB.json (a `TrainJob`) and runs
this itself through `train.launcher` when `train.processes` > 1; with one process the train stage
calls `run_job` directly. Every process draws only its own samples of each step's global batch (see
`pd_model.train`) and gradients are summed with one all-reduce per step, so N processes give the
weights of one process with the same `train.batch_size`, up to float summation order. Backend: nccl
on CUDA (one GPU per process), gloo on CPU.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pd_core import launch as launch_
from pd_core.config import Frozen
from pd_data.config import Pairing
from pd_core.state import atomic_write_bytes
from pd_model.config import TrainConfig
from pd_model.loop import world
from pd_model.train import ModelSpec

MODULE = "pd_model.train_dist"  # what both launchers run: `python -m pd_model.train_dist JOB.json`


class TrainJob(Frozen):
    """Everything a worker needs, as paths and config: what the stage would have done in-process."""

    base: str  # diffusers folder (or cached repo id) of the frozen base
    images: str  # ingest folder
    annotations: str  # annotate folder
    cfg: TrainConfig
    spec: ModelSpec
    out: str  # the model's folder: checkpoints/, validation/, controlnet/, pipeline.json, losses.json
    validation_guidance: float = 3.0  # of the validation grids (cfg.validate_every); the benchmark's, say
    init: str | None = None  # a saved ControlNet folder to continue from (retraining), else the base's copy
    pairing: Pairing = "other-layout"  # data.pairing: where each prompt's example pair comes from


def run_job(job: TrainJob, on_grid: Callable[[Path, int], None] | None = None) -> list[float]:
    """Train; the main process writes the model folder, `losses.json` last (it marks it complete).

    `on_grid(path, step)` gets each validation grid as it is saved (in this process only)."""
    from pd_data.dataset import load_split
    from pd_model.base import load_base
    from pd_model.pipeline import load_trained, save_trained
    from pd_model.checkpoint import save_losses
    from pd_model.train import train_controlnet

    out = Path(job.out)
    base = load_base(job.base).freeze()  # this process's own copy: a decoder trained in place changes only it
    init = None if job.init is None else Path(job.init)
    if init is not None and job.cfg.train_unet_decoder:  # continue the model's own decoder when it has one
        own = load_trained(init.parent)[2]
        base = base.with_unet(own) if own is not None else base
    data = load_split(Path(job.images), Path(job.annotations), "train", job.pairing)
    try:  # validation-grid prompts; without a val split, held-out draws of train
        val = load_split(Path(job.images), Path(job.annotations), "val", job.pairing)
    except ValueError:
        val = None
    net, losses = train_controlnet(base, data, job.cfg, job.spec, folder=out, val_data=val, init=init,
                                   validation_guidance=job.validation_guidance, on_grid=on_grid)
    if world()[0] == 0:
        save_trained(out, net, base, job.base, job.spec.kind, job.spec.tasks, job.cfg.train_unet_decoder)
        save_losses(out / "losses.json", losses)
    return losses


def check_devices(cfg: TrainConfig) -> None:
    """Reject a process count this machine cannot place (one GPU each on CUDA) before any training."""
    launch_.check_devices("train", cfg.device, cfg.processes)


def launch(job: TrainJob) -> None:
    """Run `job` on `job.cfg.processes` local processes through `job.cfg.launcher`; raise if any fails."""
    from pd_model.precision import resolve
    from pd_model.train import resolve_device

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "job.json"
    atomic_write_bytes(path, job.model_dump_json(indent=2).encode())
    n = job.cfg.processes
    cmd = launch_.torchrun_command(MODULE, path, n) if job.cfg.launcher == "torchrun" else \
        launch_.accelerate_command(MODULE, path, n, resolve(job.cfg.mixed_precision, resolve_device(job.cfg)))
    proc = launch_.start(cmd, int(os.environ.get("OMP_NUM_THREADS", "1")))
    returncode = launch_.wait(proc)
    if returncode != 0:
        raise RuntimeError(f"distributed training of {out.name} failed (exit {returncode}); its workers' output is "
                           f"above. Rerun by hand with: {' '.join(cmd)}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    if "WORLD_SIZE" not in os.environ and "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ:
        # accelerate's one-process launcher, asked for more: two machines would each train the whole job alone
        print("accelerate launch started one process where more were asked for: on a machine without GPUs it starts "
              "several only with --multi_gpu: accelerate launch --multi_gpu --num_processes N -m pd_model.train_dist "
              f"{argv[0]}", file=sys.stderr)
        return 2
    job = TrainJob.model_validate_json(Path(argv[0]).read_text())
    if "WORLD_SIZE" not in os.environ:  # one process (`accelerate launch --num_processes 1`): no group to join
        run_job(job)
        return 0
    cuda = job.cfg.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        run_job(job)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
