"""ControlNet training: joint Prompt Diffusion over the trained tasks, or one CN(FT) baseline per task.

Sample i of step s (its task, prompt, dropout, noise and timestep) comes from generators seeded by
(seed, seed_offset, s, i) alone, so a step's batch depends neither on what ran before it nor on how
many processes, micro-batches and loader workers share it. The loop itself is `pd_model.loop`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import ControlNetModel

from pd_data.dataset import SplitData
from pd_data.tasks import Prompt, get_task
from pd_model.base import BaseModel
from pd_model.config import Sampler, TrainConfig
from pd_model.controlnet import Kind, as_kind, controlnet_class
from pd_model.names import label
from pd_model.loop import Checkpointing, Optim, micro_batches, run, world
from pd_model.precision import describe, fast_layout, resolve
from pd_model.objective import TextCache, cfg_dropout, denoising_loss, stack_images, to_batch
from pd_model.tracking import LOGS, Tracking
from pd_model.validation import grid_rows, save_validation_grid

VAL_KEY = 1_000_003  # seeds of validation prompts and their noise, apart from every training step's


@dataclass(frozen=True)
class ModelSpec:
    """One model a train stage trains: its folder name, kind, tasks, steps, seed offset and replicate
    (replicate r > 0 is the same model trained again from another seed: `train.replicates`)."""

    name: str
    kind: Kind
    tasks: tuple[str, ...]
    steps: int
    seed_offset: int = 0
    replicate: int = 0


def build_controlnet(base: BaseModel, kind: str, pair_context: bool = False) -> ControlNetModel:
    """A ControlNet of `kind` copied from the base's UNet encoder (zero convolutions at zero);
    `pair_context` (Prompt Diffusion only): the pooled pair vector in every block (pd_model.controlnet)."""
    # Pixel space: one conditioning level (no downsampling); latent space: SD's default 8x stack.
    emb_channels = (16,) if base.vae is None else (16, 32, 96, 256)
    extra = {"pair_context": True} if pair_context and as_kind(kind) == "prompt-diffusion" else {}
    return controlnet_class(kind).from_unet(base.unet, conditioning_embedding_out_channels=emb_channels, **extra)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """cfg.device, with one GPU per process (LOCAL_RANK) on CUDA."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ValueError("train.device='cuda' but no CUDA device is visible; set train.device=cpu (or auto)")
    if cfg.device == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def validation_prompts(data: SplitData, specs: list, n: int, seed: int) -> list[Prompt]:
    """n fixed prompts, tasks in turn, each from its own seed: the same set at every validation grid."""
    return [data.sample_prompt(specs[i % len(specs)], np.random.default_rng([seed, VAL_KEY, i])) for i in range(n)]


class PromptSamples(torch.utils.data.Dataset):
    """Sample (step, i) of a ControlNet run: its task, prompt, dropout draw and noise seed, from the
    generator seeded by (*key, step, i) alone, so it is the same whichever process or loader worker
    composes it. Images are (H, W, 3) uint8 arrays (decoding and composition happen here, off the loop)."""

    def __init__(self, data: SplitData, specs: list, key: tuple[int, int]):
        self.data, self.specs, self.key = data, specs, key

    def __getitem__(self, index: tuple[int, int]) -> dict:
        r = np.random.default_rng([*self.key, *index])
        p = self.data.sample_prompt(self.specs[int(r.integers(len(self.specs)))], r)
        return {"example_source": p.example_source, "example_target": p.example_target, "query": p.query,
                "target": p.target, "text": p.text, "u": r.random(), "gen_seed": int(r.integers(2**63))}


def _collate(items: list[dict]) -> dict:
    """(B, 3, H, W) uint8 tensors of the four images, and the texts, dropout draws and noise seeds."""
    return stack_images(items, dict.get) | {"texts": [it["text"] for it in items], "u": np.array([it["u"] for it in items]),
                  "gen_seeds": [it["gen_seed"] for it in items], "index": [it["index"] for it in items]}


class _Keys(torch.utils.data.Dataset):
    """`PromptSamples` with each item's (step, i) attached, to check the order batches arrive in."""

    def __init__(self, samples: PromptSamples):
        self.samples = samples

    def __getitem__(self, index):
        return self.samples[index] | {"index": tuple(index)}


class StepLoader:
    """This process's micro-batches of steps [first, steps) through a `torch.utils.data.DataLoader`:
    `workers` processes compose samples ahead of the loop (2 batches each), 0 composes them in the
    loop. `next(step, idx)` returns the batch of `idx` at `step` and counts the seconds waited."""

    def __init__(self, samples: PromptSamples, steps: int, slices: list[range], workers: int = 0, pin_memory: bool = False):
        self.samples, self.steps, self.slices, self.workers, self.pin = samples, steps, slices, workers, pin_memory
        self._it, self.wait_s, self.first_wait_s = None, 0.0, None  # the first: worker start-up included

    def _start(self, first: int) -> None:
        batches = [[(s, i) for i in idx] for s in range(first, self.steps) for idx in self.slices]
        kw = {"num_workers": self.workers, "persistent_workers": False, "pin_memory": self.pin}
        if self.workers:  # forkserver: no fork of a process whose threads (Prefect's, torch's) hold locks
            kw |= {"prefetch_factor": 2, "multiprocessing_context": "forkserver"}
        self._it = iter(torch.utils.data.DataLoader(_Keys(self.samples), batch_sampler=batches, collate_fn=_collate, **kw))

    def next(self, step: int, idx: range) -> dict:
        t0 = time.perf_counter()
        if self._it is None:
            self._start(step)
        b = next(self._it)
        waited = time.perf_counter() - t0
        if self.first_wait_s is None:
            self.first_wait_s = waited
        self.wait_s += waited
        if b["index"][0] != (step, idx.start):
            raise RuntimeError(f"data loader out of order: got sample {b['index'][0]}, expected {(step, idx.start)}")
        return b

    def close(self) -> None:
        self._it = None  # shuts the workers down

def _trainable(base: BaseModel, controlnet: ControlNetModel, cfg: TrainConfig) -> dict[str, torch.nn.Module]:
    """Everything this run trains, by name: the ControlNet, and the UNet decoder with train_unet_decoder."""
    modules = {"controlnet": controlnet}
    if cfg.train_unet_decoder:
        modules |= {"unet_up_blocks": base.unet.up_blocks, "unet_conv_norm_out": base.unet.conv_norm_out,
                    "unet_conv_out": base.unet.conv_out}
    for m in modules.values():
        m.requires_grad_(True)
    return modules


def _loss_fn(base: BaseModel, controlnet: ControlNetModel, cfg: TrainConfig, loader: "StepLoader") -> Callable:
    """step_loss(step, idx) of the loop: the micro-batch's loss with the paper's dropout applied."""
    text_cache = TextCache(base)
    empty = text_cache([""])[0]
    hint_range = getattr(controlnet.config, "hint_range", "-1,1")  # the range this ControlNet's hints live in

    def step_loss(step: int, idx: range) -> torch.Tensor:
        b = loader.next(step, idx)
        batch = to_batch(b, b["texts"], hint_range)
        drop_text, drop_pair = cfg_dropout(b["u"], cfg)
        emb = text_cache(batch.texts)
        emb[torch.from_numpy(drop_text)] = empty  # dropped text = embedding of ""
        batch.pair[torch.from_numpy(drop_pair)] = 0.0  # dropped pair = zeros; the query is never dropped
        gens = [torch.Generator().manual_seed(int(g)) for g in b["gen_seeds"]]
        return denoising_loss(base, batch, emb, gens, controlnet, cfg.snr_gamma, cfg.timesteps)
    return step_loss


def _grids(base: BaseModel, controlnet: ControlNetModel, prompts: list[Prompt], folder: Path, seed: int, guidance: float,
           on_grid: Callable[[Path, int], None] | None) -> Callable[[int], Path]:
    """The loop's `every` callback: a validation grid at a step, handed to `on_grid(path, step)` (and
    returned: the loop logs it to the tracker)."""
    def draw(step: int) -> Path:
        path = save_validation_grid(base, controlnet, prompts, folder, step, seed, Sampler(steps=10, guidance_scale=guidance))
        if on_grid is not None:
            on_grid(path, step)
        return path
    return draw


def run_config(cfg: TrainConfig, spec: ModelSpec, device: torch.device, o: Optim) -> dict:
    """The training configuration as resolved for this run, for the tracker's hyperparameters."""
    return {"train": cfg.model_dump(), "model": asdict(spec),
            "resolved": {"device": str(device), "autocast": describe(o.mixed_precision),
                         "processes": world()[1], "steps": o.steps}}


def train_controlnet(base: BaseModel, data: SplitData, cfg: TrainConfig, spec: ModelSpec, *, folder: Path | None = None,
                     val_data: SplitData | None = None, init: Path | None = None, validation_guidance: float = 3.0,
                     on_grid: Callable[[Path, int], None] | None = None, stats: dict | None = None) -> tuple[ControlNetModel, list[float]]:
    """Train the ControlNet `spec` describes (and the base's decoder with `cfg.train_unet_decoder`, in place).

    `folder` (the model's folder) holds `checkpoints/` (with `cfg.checkpoint_every`: everything trained,
    resumed from after a kill), `validation/` (with `cfg.validate_every`: grids on fixed prompts
    from `val_data`, else held-out draws of `data`, each handed to `on_grid(path, step)`) and `logs/`
    (the `cfg.report_to` tracker's run: per-step scalars, the grids, the configuration). `init`: a
    saved ControlNet folder to continue from (retraining). `stats`, if given, receives the seconds
    the loop waited for data (`cfg.loader_workers` processes compose samples) and its wall time."""
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed + spec.seed_offset)
    base.freeze()
    base.unet.to(device)
    if base.vae is not None:
        base.vae.to(device)
    controlnet = build_controlnet(base, spec.kind, cfg.pair_context) if init is None else controlnet_class(spec.kind).from_pretrained(init)
    if init is not None and as_kind(spec.kind) == "prompt-diffusion" \
            and getattr(controlnet.config, "pair_context", False) != cfg.pair_context:
        raise ValueError(f"train.pair_context={cfg.pair_context} cannot apply when continuing from {init}, which was "
                         f"trained with pair_context={getattr(controlnet.config, 'pair_context', False)}; match it, "
                         f"or train from scratch")
    controlnet = controlnet.to(device).train()
    modules = _trainable(base, controlnet, cfg)
    params = [p for m in modules.values() for p in m.parameters()]
    if cfg.gradient_checkpointing:  # recompute activations in backward: less memory, more compute
        # The UNet too, frozen or not: the ControlNet's gradient flows back through its decoder.
        controlnet.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    specs = [get_task(t) for t in spec.tasks]
    loader = StepLoader(PromptSamples(data, specs, (cfg.seed, spec.seed_offset)), spec.steps,
                        micro_batches(cfg.batch_size, cfg.grad_accum_steps), cfg.loader_workers, pin_memory=device.type == "cuda")
    ckpt = Checkpointing(folder / "checkpoints", modules, cfg.checkpoint_every, cfg.keep_last) \
        if folder is not None and cfg.checkpoint_every else None
    every = None
    if folder is not None and cfg.validate_every:
        held_out = val_data is not None and val_data.has_pairs()
        seed = cfg.seed + spec.seed_offset + (0 if held_out else 1)
        prompts = validation_prompts(val_data if held_out else data, specs, grid_rows(len(specs)), seed)
        every = (cfg.validate_every, _grids(base, controlnet, prompts, folder / "validation", seed, validation_guidance, on_grid))
    o = Optim.of(cfg, spec.steps, resolve(cfg.mixed_precision, device))
    desc = label(spec.name)
    track = Tracking(cfg.report_to, folder / LOGS, spec.name, run_config(cfg, spec, device, o)) if folder is not None else None
    t0 = time.perf_counter()
    try:
        with fast_layout([controlnet, base.unet], o.mixed_precision, device):
            losses = run(params, o, _loss_fn(base, controlnet, cfg, loader), desc, ckpt, every, track)
    finally:
        loader.close()
    if stats is not None:
        stats.update(data_wait_s=loader.wait_s, first_batch_wait_s=loader.first_wait_s or 0.0,
                     wall_s=time.perf_counter() - t0, loader_workers=cfg.loader_workers)
    return controlnet.eval(), losses
