"""Training: the tiny base (text -> image), joint Prompt Diffusion, and per-task CN(FT) baselines.

Every random choice of step `s` comes from generators seeded by (seed, s) (and, for the ControlNets,
the sample index), so a step's batch depends neither on what ran before it nor on how many processes
and micro-batches share it.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pd_data.dataset import SplitData
from pd_data.tasks import TRAINING_TASKS, Prompt, get_task
from pd_model.base import BaseModel
from pd_model.config import BaseModelConfig, TrainConfig
from pd_model.controlnet import PromptDiffusionControlNet
from pd_model.checkpoint import list_checkpoints, load_checkpoint, read_trainer, save_best, save_checkpoint
from pd_model.hints import to_hint, to_unit
from pd_model.validation import grid_rows, save_validation_grid

Mode = Literal["prompt_diffusion", "cnft"]
VAL_KEY = 1_000_003  # seeds of validation prompts and their noise, apart from every training step's


class TextCache:
    """Embeddings of the frozen text encoder, computed once per distinct string."""

    def __init__(self, base: BaseModel):
        self.base, self.cache = base, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            for t, e in zip(new, self.base.encode_text(new)):
                self.cache[t] = e
        return torch.stack([self.cache[t] for t in texts])  # (B, T, D)


def cfg_dropout(u: np.ndarray, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Paper's dropout from one uniform draw per sample: (drop_text, drop_pair) boolean masks."""
    a, b, c = cfg.drop_text, cfg.drop_text + cfg.drop_text_and_pair, cfg.drop_text + cfg.drop_text_and_pair + cfg.drop_pair
    drop_text = u < b
    drop_pair = (u >= a) & (u < c)
    return drop_text, drop_pair


@dataclass
class Batch:
    target: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    texts: list[str]
    pair: torch.Tensor | None = None   # (B, 6, H, W) in the hint range
    query: torch.Tensor | None = None  # (B, 3, H, W) in the hint range


PROMPT_IMAGES = ("example_source", "example_target", "query", "target")


def stack_images(items: list, get=getattr) -> dict[str, torch.Tensor]:
    """The four images of prompts (or of loader items, `get=dict.get`) as (B, 3, H, W) uint8 tensors."""
    return {k: torch.from_numpy(np.stack([get(it, k) for it in items])).permute(0, 3, 1, 2) for k in PROMPT_IMAGES}


def to_batch(images: dict[str, torch.Tensor], texts: list[str], hint_range: str) -> Batch:
    """A `Batch` of `stack_images` tensors: the target in [-1, 1], the pair and query in the hint range."""
    pair = torch.cat([to_hint(images["example_source"], hint_range), to_hint(images["example_target"], hint_range)], 1)
    return Batch(to_unit(images["target"]) * 2 - 1, texts, pair, to_hint(images["query"], hint_range))


def prompt_batch(prompts: list[Prompt], hint_range: str) -> Batch:
    return to_batch(stack_images(prompts), [p.text for p in prompts], hint_range)


def sample_generators(key: tuple[int, ...], indices: range) -> list[torch.Generator]:
    """One torch generator per sample, seeded from (key, sample index) alone: a sample's noise does not
    depend on which process or micro-batch it landed in."""
    return [torch.Generator().manual_seed(int(np.random.default_rng([*key, i]).integers(2**63))) for i in indices]


def draw_noise(gens: list[torch.Generator], shape: tuple[int, ...], num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, *shape) noise and (B,) timesteps, sample i's from gens[i] only."""
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    t = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in gens])
    return noise, t


def prediction_loss(base: BaseModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                    batch: Batch, controlnet: ControlNetModel | None = None, snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE of the UNet's prediction at timesteps `t` against the scheduler's target: the noise
    (`prediction_type='epsilon'`, SD 1.5) or the velocity sqrt(ab) * noise - sqrt(1 - ab) * x0
    ('v_prediction'). The ControlNet (if any) adds its residuals.

    `snr_gamma` > 0 is min-SNR weighting (Hang et al. 2023): sample i weighs min(SNR, gamma) / SNR for
    epsilon and min(SNR, gamma) / (SNR + 1) for v, so the many nearly-clean timesteps stop
    dominating and training converges faster."""
    dev = base.unet.device
    x0, noise, t, emb = x0.to(dev), noise.to(dev), t.to(dev), emb.to(dev)
    xt = base.scheduler.add_noise(x0, noise, t)
    extra = {}
    if controlnet is not None:
        pd = isinstance(controlnet, PromptDiffusionControlNet)
        kw = {"controlnet_query_cond": batch.query.to(dev)} if pd else {}
        cond = (batch.pair if pd else batch.query).to(dev)
        down, mid = controlnet(xt, t, emb, controlnet_cond=cond, return_dict=False, **kw)
        extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    pred = base.unet(xt, t, emb, **extra).sample
    v = base.scheduler.config.prediction_type == "v_prediction"
    target = base.scheduler.get_velocity(x0, noise, t) if v else noise
    if snr_gamma <= 0:
        return F.mse_loss(pred.float(), target.float())  # in fp32 under bf16 autocast too
    ab = base.scheduler.alphas_cumprod.to(dev)[t]
    snr = ab / (1 - ab)
    per_sample = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    return (per_sample * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v else snr)).mean()


def denoising_loss(base: BaseModel, batch: Batch, emb: torch.Tensor, gens: list[torch.Generator],
                   controlnet: ControlNetModel | None = None, snr_gamma: float = 0.0) -> torch.Tensor:
    """`prediction_loss` with each sample's latent, noise and timestep drawn from its own generator."""
    x0 = base.to_model_space(batch.target.to(base.unet.device), gens)
    noise, t = draw_noise(gens, tuple(x0.shape[1:]), base.scheduler.config.num_train_timesteps)
    return prediction_loss(base, x0, noise, t, emb, batch, controlnet, snr_gamma)


@dataclass(frozen=True)
class Optim:
    """AdamW, warm-up, clipping, EMA, and how one step's global batch is split and computed."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    ema_decay: float = 0.0
    grad_accum_steps: int = 1
    autocast: tuple[str, torch.dtype] | None = None  # (device type, dtype), e.g. ("cuda", torch.bfloat16)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often `_loop` checkpoints; an existing checkpoint there is resumed from.

    With `val_loss`, each checkpoint also scores the (EMA) weights and keeps the best as `best`."""

    root: Path
    model: torch.nn.Module
    every: int
    keep_last: int = 2
    val_loss: Callable[[], float] | None = None


def world() -> tuple[int, int]:
    """(rank, number of processes) of the torch.distributed group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def micro_batches(batch_size: int, accum: int) -> list[range]:
    """This process's slices of the global batch: a contiguous 1/world share, cut into `accum` pieces."""
    rank, n = world()
    per = batch_size // n
    micro = per // accum
    return [range(rank * per + m * micro, rank * per + (m + 1) * micro) for m in range(accum)]


def _all_reduce_sum(grads: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum gradients and the loss over processes in one collective (one flat buffer)."""
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype if grads else loss.dtype)])
    dist.all_reduce(flat)
    for g, v in zip(grads, flat[:-1].split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))
    return flat[-1]


@contextmanager
def ema_weights(ema: EMAModel | None, params: list[torch.nn.Parameter]):
    """The EMA weights in place of the trained ones for the duration (what the run will ship)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _loop(params: list[torch.nn.Parameter], o: Optim, step_loss: Callable[[int, range], torch.Tensor], desc: str,
          ckpt: Checkpointing | None = None, every: tuple[int, Callable[[int], None]] | None = None) -> list[float]:
    """AdamW steps on the global-batch mean of `step_loss(step, samples)`; with `o.ema_decay` > 0 the
    parameters end as their EMA. `every=(n, f)` calls f(step) on the main process every n steps and at
    the last, with the EMA weights in place.

    Each process backpropagates sum-over-its-samples / batch_size; summing over processes gives the
    gradient of the global mean, whatever the number of processes and micro-batches."""
    rank, n_proc = world()
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    ema = EMAModel(params, decay=o.ema_decay) if o.ema_decay > 0 else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / o.warmup_steps) if o.warmup_steps else 1.0)
    losses: list[float] = []
    start, best = 0, None
    if ckpt is not None and (saved := list_checkpoints(ckpt.root)):
        start, losses, states = load_checkpoint(saved[-1], ckpt.model)
        best = read_trainer(saved[-1]).get("best")
        opt.load_state_dict(states["optimizer"])
        sched.load_state_dict(states["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(states["ema"])
        if rank == 0:
            print(f"{desc}: resuming from {saved[-1]} (step {start} of {o.steps})")
    slices = micro_batches(o.batch_size, o.grad_accum_steps)
    bar = tqdm(range(start, o.steps), desc=desc, unit="step", mininterval=2.0, initial=start, total=o.steps,
               disable=rank != 0)
    t0 = time.perf_counter()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for idx in slices:
            with torch.autocast(*(o.autocast or ("cpu",)), enabled=o.autocast is not None):
                part = step_loss(step, idx) * (len(idx) / o.batch_size)
            part.backward()
            loss = loss + part.detach().float().cpu()
        if n_proc > 1:
            grads = [p.grad for p in params if p.grad is not None]
            loss = _all_reduce_sum(grads, loss.to(grads[0].device)).cpu()
        if not math.isfinite(loss.item()):
            last = list_checkpoints(ckpt.root)[-1] if ckpt is not None and list_checkpoints(ckpt.root) else None
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}; training stopped. Last good "
                                     f"checkpoint: {last or 'none'}. Lower train.learning_rate or check the data.")
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(params)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}",
                        samples_s=f"{(step + 1 - start) * o.batch_size / (time.perf_counter() - t0):.1f}", refresh=False)
        if rank == 0 and every is not None and every[0] and ((step + 1) % every[0] == 0 or step + 1 == o.steps):
            with ema_weights(ema, params):
                every[1](step + 1)
        if rank == 0 and ckpt is not None and ckpt.every and ((step + 1) % ckpt.every == 0 or step + 1 == o.steps):
            states = {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}
            if ema is not None:
                states["ema"] = ema.state_dict()
            extra = {}
            if ckpt.val_loss is not None:
                with ema_weights(ema, params):  # the weights the run would ship
                    val = ckpt.val_loss()
                    if best is None or val < best["val_loss"]:
                        best = {"step": step + 1, "val_loss": val, "path": save_best(ckpt.root, step + 1, ckpt.model, val)}
                extra = {"val_loss": val, "best": best}
            save_checkpoint(ckpt.root, step + 1, ckpt.model, states, losses, ckpt.keep_last, extra)
    if ema is not None:
        ema.copy_to(params)
    return losses


def train_base(base: BaseModel, data: SplitData, cfg: BaseModelConfig,
               every: tuple[int, Callable[[int], None]] | None = None) -> list[float]:
    """Text-to-image training of the tiny base on the ingested images and captions. `every=(n, f)`
    calls f(step) every n steps and at the last, EMA weights in place (scripts/bench_base.py scores
    samples along one run that way)."""
    ids = sorted(data.captions)
    text_cache = TextCache(base)
    base.unet.train()
    base.text_encoder.requires_grad_(False)

    # (modality, text) of the trained forward tasks: "depth map", ... (see BaseModelConfig.map_fraction)
    have = set(data.modalities)
    maps = [(get_task(t).target, get_task(t).fixed_text) for t in TRAINING_TASKS
            if get_task(t).source == "image" and get_task(t).target in have]

    def step_loss(step: int, idx: range) -> torch.Tensor:
        # The whole global batch is drawn (as before slicing existed), then this micro-batch's slice taken.
        rng = np.random.default_rng([cfg.seed, step])
        pick = [ids[i] for i in rng.integers(len(ids), size=cfg.batch_size)]
        # 10% empty captions, so that classifier-free guidance has an unconditional model to use.
        texts = ["" if u < 0.1 else data.captions[i] for i, u in zip(pick, rng.random(len(pick)))]
        arrays = [data.arrays[i]["image"] for i in pick]
        if cfg.map_fraction > 0 and maps:  # drawn after the draws above, so map_fraction=0 keeps the batches as they were
            for k, (u, m) in enumerate(zip(rng.random(len(pick)), rng.integers(len(maps), size=len(pick)))):
                if u < cfg.map_fraction:
                    modality, text = maps[int(m)]
                    arrays[k], texts[k] = data.arrays[pick[k]][modality], ("" if texts[k] == "" else text)
        x = to_unit(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)) * 2 - 1
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, base.scheduler.config.num_train_timesteps, (x.shape[0],), generator=gen)
        s = slice(idx.start, idx.stop)
        texts = texts[s]
        return prediction_loss(base, x[s], noise[s], t[s], encode(texts), Batch(x[s], texts), snr_gamma=cfg.snr_gamma)

    params = list(base.unet.parameters())
    if cfg.train_text_encoder:  # learnt with the UNet: a random frozen encoder mixes the words of a caption
        base.text_encoder.requires_grad_(True).train()
        params += list(base.text_encoder.parameters())

    def encode(texts: list[str]) -> torch.Tensor:
        if not cfg.train_text_encoder:
            return text_cache(texts)
        tok = base.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=base.tokenizer.model_max_length, return_tensors="pt")
        return base.text_encoder(tok.input_ids)[0]

    losses = _loop(params, Optim(cfg.train_steps, cfg.batch_size, cfg.learning_rate, ema_decay=cfg.ema_decay),
                   step_loss, "base", every=every)
    base.unet.eval()
    base.text_encoder.requires_grad_(False).eval()
    return losses


def build_controlnet(base: BaseModel, mode: Mode) -> ControlNetModel:
    # Pixel space: one conditioning level (no downsampling); latent space: SD's default 8x stack.
    emb_channels = (16,) if base.vae is None else (16, 32, 96, 256)
    if mode == "prompt_diffusion":
        return PromptDiffusionControlNet.from_unet(base.unet, conditioning_embedding_out_channels=emb_channels)
    return ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=emb_channels)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """cfg.device, with one GPU per process (LOCAL_RANK) on CUDA."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ValueError("train.device='cuda' but no CUDA device is visible; set train.device=cpu (or auto)")
    if cfg.device == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def autocast_for(cfg: TrainConfig, device: torch.device) -> tuple[str, torch.dtype] | None:
    """bf16 autocast when asked, or for 'auto' on a CUDA device that supports it; None is fp32."""
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"
                                         and torch.cuda.is_bf16_supported()):
        return device.type, torch.bfloat16
    return None


def validation_prompts(data: SplitData, specs: list, n: int, seed: int) -> list[Prompt]:
    """n fixed prompts, tasks in turn, each from its own seed: the same set at every checkpoint."""
    return [data.sample_prompt(specs[i % len(specs)], np.random.default_rng([seed, VAL_KEY, i])) for i in range(n)]


@torch.no_grad()
def validation_loss(base: BaseModel, controlnet: ControlNetModel, prompts: list[Prompt], text_cache: TextCache,
                    seed: int, batch_size: int = 8) -> float:
    """Mean denoising loss on fixed prompts, noise and timesteps (no dropout): comparable across steps."""
    total = 0.0
    for s in range(0, len(prompts), batch_size):
        idx = range(s, min(s + batch_size, len(prompts)))
        batch = prompt_batch([prompts[i] for i in idx], "-1,1")
        loss = denoising_loss(base, batch, text_cache(batch.texts), sample_generators((seed, VAL_KEY), idx), controlnet)
        total += loss.item() * len(idx)
    return total / len(prompts)


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


def train_controlnet(base: BaseModel, data: SplitData, tasks: tuple[str, ...], cfg: TrainConfig,
                     mode: Mode, steps: int, seed_offset: int = 0, checkpoint_dir: Path | None = None,
                     val_data: SplitData | None = None, init: Path | None = None, validation_dir: Path | None = None,
                     validation_guidance: float = 3.0, on_grid: Callable[[Path, int], None] | None = None,
                     stats: dict | None = None) -> tuple[ControlNetModel, list[float]]:
    """Joint Prompt Diffusion training over `tasks` (uniform per sample), or CN(FT) on one task.

    Sample i of step s is drawn from (seed, seed_offset, s, i) alone: its task, prompt, dropout,
    noise and timestep; a process computes only its own slice of the global batch. Validation
    prompts (for the best checkpoint) come from `val_data`, else from the training data under a
    separate seed. `init`: a saved ControlNet folder to continue from (retraining) instead of the
    base's copy. With `cfg.validate_every` and `validation_dir`, the main process saves a grid of
    outputs on the first of those prompts every N steps (see `pd_model.validation`) and hands each
    to `on_grid(path, step)`, e.g. to publish it. Samples are composed by a `StepLoader` (with
    `cfg.loader_workers` worker processes); `stats`, if given, receives the seconds the loop waited
    for data and its wall time."""
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed + seed_offset)
    base.freeze()
    base.unet.to(device)
    if base.vae is not None:
        base.vae.to(device)
    controlnet = build_controlnet(base, mode)
    if init is not None:
        controlnet = type(controlnet).from_pretrained(init)
    controlnet = controlnet.to(device).train()
    params = list(controlnet.parameters())
    if cfg.train_unet_decoder:
        for m in (base.unet.up_blocks, base.unet.conv_norm_out, base.unet.conv_out):
            m.requires_grad_(True)
            params += list(m.parameters())
    if cfg.gradient_checkpointing:  # recompute activations in backward: less memory, more compute
        # The UNet too, frozen or not: the ControlNet's gradient flows back through its decoder.
        controlnet.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    specs = [get_task(t) for t in tasks]
    text_cache = TextCache(base)
    empty = text_cache([""])[0]

    samples = PromptSamples(data, specs, (cfg.seed, seed_offset))
    loader = StepLoader(samples, steps, micro_batches(cfg.batch_size, cfg.grad_accum_steps), cfg.loader_workers,
                        pin_memory=device.type == "cuda")

    def step_loss(step: int, idx: range) -> torch.Tensor:
        b = loader.next(step, idx)
        batch = to_batch(b, b["texts"], "-1,1")
        drop_text, drop_pair = cfg_dropout(b["u"], cfg)
        emb = text_cache(batch.texts)
        emb[torch.from_numpy(drop_text)] = empty  # dropped text = embedding of ""
        batch.pair[torch.from_numpy(drop_pair)] = 0.0  # dropped pair = zeros; the query is never dropped
        gens = [torch.Generator().manual_seed(int(g)) for g in b["gen_seeds"]]
        return denoising_loss(base, batch, emb, gens, controlnet, cfg.snr_gamma)

    desc = "prompt-diffusion" if mode == "prompt_diffusion" else f"cn-ft {tasks[0]}"
    held_out = val_data is not None and val_data.has_pairs()
    val_seed = cfg.seed + seed_offset + (0 if held_out else 1)
    ckpt = None
    if checkpoint_dir is not None and cfg.checkpoint_every:
        if cfg.train_unet_decoder:  # the decoder is trained too: checkpoint both
            raise ValueError("train.checkpoint_every with train.train_unet_decoder is not supported yet; set one of them off")
        val_prompts = validation_prompts(val_data if held_out else data, specs, cfg.validation_samples, val_seed)
        score = (lambda: validation_loss(base, controlnet, val_prompts, text_cache, cfg.seed)) if val_prompts else None
        ckpt = Checkpointing(checkpoint_dir, controlnet, cfg.checkpoint_every, cfg.keep_last, score)
    o = Optim(steps, cfg.batch_size, cfg.learning_rate, cfg.weight_decay, cfg.grad_clip, cfg.warmup_steps,
              cfg.ema_decay, cfg.grad_accum_steps, autocast_for(cfg, device))
    every = None
    if validation_dir is not None and cfg.validate_every:
        grid_prompts = validation_prompts(val_data if held_out else data, specs, grid_rows(len(specs)), val_seed)

        def draw(step: int) -> None:
            path = save_validation_grid(base, controlnet, grid_prompts, validation_dir, step, val_seed,
                                        guidance_scale=validation_guidance)
            if on_grid is not None:
                on_grid(path, step)
        every = (cfg.validate_every, draw)
    t0 = time.perf_counter()
    try:
        losses = _loop(params, o, step_loss, desc, ckpt, every)
    finally:
        loader.close()
    if stats is not None:
        stats.update(data_wait_s=loader.wait_s, first_batch_wait_s=loader.first_wait_s or 0.0,
                     wall_s=time.perf_counter() - t0, loader_workers=cfg.loader_workers)
    return controlnet.eval(), losses


def save_losses(path: Path, losses: list[float]) -> None:
    from pd_data.state import atomic_write_bytes

    atomic_write_bytes(path, json.dumps({"loss": losses}).encode())
