"""Benchmark generation as files: every sample one PNG, written atomically, sharded over processes,
resumable per sample.

    torchrun --nproc_per_node=N -m pd_eval.generation JOB.json

A `Request` is one model's samples of one task. Its items are cut into batches of `eval.batch_size`
in a fixed order, and batch j of the whole evaluation goes to process j mod N: a sample's batch, and so
its PNG, is the same whatever the number of processes (a batch's composition matters: batched
convolutions sum in another order, which can move a pixel by one level; `eval.batch_size` is part of
the evaluation's key). A batch whose PNGs all exist is skipped, so a killed evaluation resumes where it
stopped; each PNG appears whole or not at all (`pd_core.state.atomic_write_bytes`), so a kill at any
moment leaves nothing that blocks a rerun. The evaluate stage runs this in process when
`eval.processes` is 1, else through torchrun, one GPU per process on CUDA.
"""
from __future__ import annotations

import contextvars
import io
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from pd_core import launch
from pd_core.config import Frozen
from pd_data.config import Pairing
from pd_core.state import atomic_write_bytes
from pd_data.tasks import Prompt, get_task
from pd_eval.config import EvalConfig


class Item(Frozen):
    """One sample: the prompt (example pair, query) and its seed."""

    name: str        # the PNG's stem
    prompt_id: str   # of the materialised prompt (task inference: "<prompt_id>@<shown task>")
    task: str        # the task whose example pair and query are composed (task inference shows other tasks')
    example_id: str
    query_id: str
    seed: int
    pair_task: str = ""  # the example pair shows this task instead (example sensitivity: `other_pair_task`)


class Request(Frozen):
    """One model's samples of one benchmarked task."""

    model_id: str              # the Table 1 row or condition ("prompt-diffusion/empty-pair", ...)
    checkpoint: str            # the trained network (a key of `GenerationJob.models`)
    task: str                  # the benchmarked task ("task-inference" for that study)
    guidance: float            # text guidance (`EvalConfig.guidance_for` of the task)
    folder: str                # of the PNGs, relative to the evaluation folder
    items: tuple[Item, ...]
    empty_pair: bool = False   # Prompt Diffusion with its pair zeroed
    no_text: bool = False      # the text removed (in-context task inference)


class GenerationJob(Frozen):
    """Everything a generation process needs, as paths and config (JSON for torchrun)."""

    base: str                  # the frozen base's folder
    models: dict[str, str]     # checkpoint -> model folder (`pd_model.pipeline.save_trained`)
    images: str
    annotations: str
    split: str
    pairing: Pairing = "other-layout"
    cfg: EvalConfig
    out: str                   # the evaluation folder; request folders are relative to it
    requests: list[Request] = Field(default_factory=list)


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a if a.dtype == np.uint8 else np.asarray(a).round().clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: Path, a: np.ndarray) -> Path:
    atomic_write_bytes(path, png_bytes(a))
    return path


def complete(path: Path) -> bool:
    """A sample on disk. Writes are atomic, so a file that exists is whole; an empty one (written by an
    older version, in place) counts as missing."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def read_pngs(paths: list[Path]) -> np.ndarray:
    """(N, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def batches(job: GenerationJob) -> list[tuple[Request, tuple[Item, ...]]]:
    """Every batch of the evaluation, in its fixed order."""
    size = job.cfg.batch_size
    return [(r, r.items[i:i + size]) for r in job.requests for i in range(0, len(r.items), size)]


def paths(out: str | Path, request: Request, items: tuple[Item, ...] | None = None) -> list[Path]:
    """The PNGs of the request's items (all, or `items`) under the evaluation folder `out`."""
    return [Path(out) / request.folder / f"{it.name}.png" for it in (request.items if items is None else items)]


def missing(job: GenerationJob) -> int:
    """Samples of the job not on disk yet."""
    return sum(not complete(p) for r in job.requests for p in paths(job.out, r))


def check_devices(cfg: EvalConfig) -> None:
    """Reject a process count this machine cannot place (one GPU each on CUDA) before any work."""
    launch.check_devices("eval", cfg.device, cfg.processes)


def resolve_device(name: str) -> torch.device:
    """`eval.device`, with one GPU per process (LOCAL_RANK) on CUDA."""
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ValueError("eval.device='cuda' but no CUDA device is visible; set eval.device=cpu (or auto)")
    if name == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


class Models:
    """The base and one trained model at a time (a job's requests come model by model), on `device`."""

    def __init__(self, job: GenerationJob, device: torch.device):
        from pd_model.base import load_base

        self.job, self.device, self.name, self.loaded = job, device, None, None
        self.base = load_base(job.base).freeze()
        for m in (self.base.unet, self.base.vae):  # the text encoder stays where the pipeline expects it (CPU)
            if m is not None:
                m.to(device)

    def get(self, checkpoint: str):
        from pd_model.pipeline import load_trained

        if checkpoint != self.name:
            self.loaded = None  # free the previous model first: at SD-1.5 size two do not fit beside the base
            _, net, unet = load_trained(self.job.models[checkpoint])
            self.name = checkpoint
            self.loaded = (self.base.with_unet(unet.to(self.device) if unet is not None else None), net.to(self.device))
        return self.loaded


@contextmanager
def cpu_threads(n: int):
    """torch's intra-op threads set to `n` for the block (process-wide), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate_shard(job: GenerationJob, rank: int = 0, world: int = 1,
                   on_written: Callable[[int], None] | None = None) -> int:
    """Generate this process's batches (every `world`-th from `rank`) whose PNGs are not all on disk,
    at `eval.threads` CPU threads; returns the samples written. `on_written(n)` after each batch that
    wrote n PNGs."""
    from pd_data.dataset import load_split
    from pd_model.controlnet import kind_of
    from pd_model.sampling import generate

    cfg, models, data, written = job.cfg, None, None, 0
    with cpu_threads(cfg.threads):
        for r, b in batches(job)[rank::world]:
            files = paths(job.out, r, b)
            todo = [not complete(p) for p in files]
            if not any(todo):
                continue
            if models is None:  # loaded only when there is something to compute (a finished job loads nothing)
                models = Models(job, resolve_device(cfg.device))
                data = load_split(Path(job.images), Path(job.annotations), job.split, job.pairing)
            base = net = None  # drop this loop's hold on the previous model before the next one loads
            base, net = models.get(r.checkpoint)
            built = [_prompt(data, it, r.no_text) for it in b]  # the whole batch: its composition fixes the PNGs
            pair_guidance = cfg.pair_guidance_scale if kind_of(net) == "prompt-diffusion" else None  # CN(FT): no pair
            sampler = replace(cfg.sampler(), guidance_scale=r.guidance, pair_guidance_scale=pair_guidance,
                              positive_suffix="" if r.no_text else cfg.positive_suffix)
            outputs = generate(base, net, built, [it.seed for it in b], sampler, empty_pair=r.empty_pair)
            for p, a, new in zip(files, outputs, todo):
                if new:  # one written before a kill is identical: kept
                    save_png(p, a)
            written += sum(todo)
            if on_written is not None:
                on_written(sum(todo))
    return written


def _prompt(data, it: Item, no_text: bool) -> Prompt:
    """The item's prompt: its task's query, target and text; the example pair of `it.pair_task` when set
    (the same example image, another task's maps); the text removed with `no_text`."""
    p = data.prompt(get_task(it.task), it.example_id, it.query_id)
    if it.pair_task:
        shown = data.prompt(get_task(it.pair_task), it.example_id, it.query_id)
        p = Prompt(p.task, shown.example_source, shown.example_target, p.query, p.target, p.text)
    return Prompt(p.task, p.example_source, p.example_target, p.query, p.target, "") if no_text else p


def run_generation(job: GenerationJob, processes: int, on_written: Callable[[int], None] | None = None) -> int:
    """Every missing sample of `job`, in this process or on `processes` local ones (torchrun); returns
    the samples written. `on_written(n)` as PNGs appear (with torchrun: counted on disk every 5 s)."""
    check_devices(job.cfg.model_copy(update={"processes": processes}))
    if processes == 1:
        return generate_shard(job, on_written=on_written)
    path = Path(job.out) / "generation-job.json"
    atomic_write_bytes(path, job.model_dump_json(indent=2).encode())
    before = missing(job)
    proc, cmd = launch.start_torchrun("pd_eval.generation", path, processes, job.cfg.threads)
    stop = threading.Event()
    ctx = contextvars.copy_context()  # the caller's run context: its log and artifacts receive the reports
    watcher = threading.Thread(target=ctx.run, args=(_watch, job, before, stop, on_written), daemon=True) \
        if on_written else None
    if watcher is not None:
        watcher.start()
    try:
        code = launch.wait(proc)
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    if code != 0:
        raise RuntimeError(f"generation on {processes} processes failed (exit {code}); the workers' output is above. "
                           f"The PNGs written are kept: rerun the stage, or by hand: {' '.join(cmd)}")
    return before - missing(job)


def _watch(job: GenerationJob, missing_before: int, stop: threading.Event, on_written: Callable[[int], None],
           every: float = 5.0) -> None:
    """Report the PNGs that appear on disk while torchrun's processes write them."""
    left = missing_before
    while not stop.wait(every):
        now = missing(job)
        on_written(left - now)
        left = now
    on_written(left - missing(job))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    job = GenerationJob.model_validate_json(Path(argv[0]).read_text())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    n = generate_shard(job, rank, world)
    print(f"generation process {rank} of {world}: {n} samples computed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
