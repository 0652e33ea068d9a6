"""Training: the tiny base (text -> image), joint Prompt Diffusion, and per-task CN(FT) baselines.

Every random choice of step `s` comes from generators seeded by (seed, s), so a step's batch does
not depend on what ran before it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pd_data.dataset import SplitData
from pd_data.tasks import Prompt, get_task
from pd_model.base import BaseModel
from pd_model.config import BaseModelConfig, TrainConfig
from pd_model.controlnet import PromptDiffusionControlNet
from pd_model.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from pd_model.hints import to_hint, to_unit

Mode = Literal["prompt_diffusion", "cnft"]


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


def prompt_batch(prompts: list[Prompt], hint_range: str) -> Batch:
    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(p, key) for p in prompts])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8

    pair = torch.cat([to_hint(stack("example_source"), hint_range), to_hint(stack("example_target"), hint_range)], 1)
    return Batch(to_unit(stack("target")) * 2 - 1, [p.text for p in prompts], pair, to_hint(stack("query"), hint_range))


def denoising_loss(base: BaseModel, batch: Batch, emb: torch.Tensor, gen: torch.Generator,
                   controlnet: ControlNetModel | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE at a random timestep; the ControlNet (if any) adds its residuals."""
    x0 = base.to_model_space(batch.target)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, base.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    xt = base.scheduler.add_noise(x0, noise, t)
    extra = {}
    if controlnet is not None:
        kw = {"controlnet_query_cond": batch.query} if isinstance(controlnet, PromptDiffusionControlNet) else {}
        cond = batch.pair if isinstance(controlnet, PromptDiffusionControlNet) else batch.query
        down, mid = controlnet(xt, t, emb, controlnet_cond=cond, return_dict=False, **kw)
        extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    pred = base.unet(xt, t, emb, **extra).sample
    return F.mse_loss(pred, noise)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often `_loop` checkpoints; an existing checkpoint there is resumed from."""

    root: Path
    model: torch.nn.Module
    every: int
    keep_last: int = 2


def _loop(params: list[torch.nn.Parameter], steps: int, lr: float, weight_decay: float, grad_clip: float,
          step_loss, desc: str, warmup_steps: int = 0, ckpt: Checkpointing | None = None,
          ema_decay: float = 0.0) -> list[float]:
    """AdamW steps of `step_loss(step)`; with `ema_decay` > 0 the parameters end as their EMA."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ema = EMAModel(params, decay=ema_decay) if ema_decay > 0 else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    losses: list[float] = []
    start = 0
    if ckpt is not None and (saved := list_checkpoints(ckpt.root)):
        start, losses, states = load_checkpoint(saved[-1], ckpt.model)
        opt.load_state_dict(states["optimizer"])
        sched.load_state_dict(states["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(states["ema"])
        print(f"{desc}: resuming from {saved[-1]} (step {start} of {steps})")
    bar = tqdm(range(start, steps), desc=desc, unit="step", mininterval=2.0, initial=start, total=steps)
    t0 = time.perf_counter()
    for step in bar:
        loss = step_loss(step)
        if not math.isfinite(loss.item()):
            last = list_checkpoints(ckpt.root)[-1] if ckpt is not None and list_checkpoints(ckpt.root) else None
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}; training stopped. Last good "
                                     f"checkpoint: {last or 'none'}. Lower train.learning_rate or check the data.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(params)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", it_s=f"{(step + 1 - start) / (time.perf_counter() - t0):.1f}",
                        refresh=False)
        if ckpt is not None and ckpt.every and ((step + 1) % ckpt.every == 0 or step + 1 == steps):
            states = {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}
            if ema is not None:
                states["ema"] = ema.state_dict()
            save_checkpoint(ckpt.root, step + 1, ckpt.model, states, losses, ckpt.keep_last)
    if ema is not None:
        ema.copy_to(params)
    return losses


def train_base(base: BaseModel, data: SplitData, cfg: BaseModelConfig) -> list[float]:
    """Text-to-image training of the tiny base on the ingested images and captions."""
    ids = sorted(data.captions)
    text_cache = TextCache(base)
    base.unet.train()
    base.text_encoder.requires_grad_(False)

    def step_loss(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, step])
        pick = [ids[i] for i in rng.integers(len(ids), size=cfg.batch_size)]
        # 10% empty captions, so that classifier-free guidance has an unconditional model to use.
        texts = ["" if u < 0.1 else data.captions[i] for i, u in zip(pick, rng.random(len(pick)))]
        x = torch.from_numpy(np.stack([data.arrays[i]["image"] for i in pick])).permute(0, 3, 1, 2)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
        return denoising_loss(base, Batch(to_unit(x) * 2 - 1, texts), text_cache(texts), gen)

    losses = _loop(list(base.unet.parameters()), cfg.train_steps, cfg.learning_rate, 0.0, 1.0, step_loss, "base",
                   ema_decay=cfg.ema_decay)
    base.unet.eval()
    return losses


def build_controlnet(base: BaseModel, mode: Mode) -> ControlNetModel:
    # Pixel space: one conditioning level (no downsampling); latent space: SD's default 8x stack.
    emb_channels = (16,) if base.vae is None else (16, 32, 96, 256)
    if mode == "prompt_diffusion":
        return PromptDiffusionControlNet.from_unet(base.unet, conditioning_embedding_out_channels=emb_channels)
    return ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=emb_channels)


def train_controlnet(base: BaseModel, data: SplitData, tasks: tuple[str, ...], cfg: TrainConfig,
                     mode: Mode, steps: int, seed_offset: int = 0,
                     checkpoint_dir: Path | None = None, init: Path | None = None) -> tuple[ControlNetModel, list[float]]:
    """Joint Prompt Diffusion training over `tasks` (uniform per sample), or CN(FT) on one task.

    `init`: a saved ControlNet folder to continue from (retraining) instead of the base's copy.
    """
    torch.manual_seed(cfg.seed + seed_offset)
    base.freeze()
    controlnet = build_controlnet(base, mode)
    if init is not None:
        controlnet = type(controlnet).from_pretrained(init)
    controlnet.train()
    params = list(controlnet.parameters())
    if cfg.train_unet_decoder:
        for m in (base.unet.up_blocks, base.unet.conv_norm_out, base.unet.conv_out):
            m.requires_grad_(True)
            params += list(m.parameters())
    specs = [get_task(t) for t in tasks]
    text_cache = TextCache(base)
    empty = text_cache([""])[0]

    def step_loss(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, seed_offset, step])
        prompts = [data.sample_prompt(specs[int(rng.integers(len(specs)))], rng) for _ in range(cfg.batch_size)]
        batch = prompt_batch(prompts, "-1,1")
        drop_text, drop_pair = cfg_dropout(rng.random(cfg.batch_size), cfg)
        emb = text_cache(batch.texts)
        emb[torch.from_numpy(drop_text)] = empty  # dropped text = embedding of ""
        batch.pair[torch.from_numpy(drop_pair)] = 0.0  # dropped pair = zeros; the query is never dropped
        gen = torch.Generator().manual_seed((cfg.seed + seed_offset) * 100_003 + step)
        return denoising_loss(base, batch, emb, gen, controlnet)

    desc = "prompt-diffusion" if mode == "prompt_diffusion" else f"cn-ft {tasks[0]}"
    ckpt = None
    if checkpoint_dir is not None and cfg.checkpoint_every:
        if cfg.train_unet_decoder:  # the decoder is trained too: checkpoint both
            raise ValueError("train.checkpoint_every with train.train_unet_decoder is not supported yet; set one of them off")
        ckpt = Checkpointing(checkpoint_dir, controlnet, cfg.checkpoint_every, cfg.keep_last)
    losses = _loop(params, steps, cfg.learning_rate, cfg.weight_decay, cfg.grad_clip, step_loss, desc,
                   cfg.warmup_steps, ckpt, cfg.ema_decay)
    return controlnet.eval(), losses


def save_losses(path: Path, losses: list[float]) -> None:
    from pd_data.state import atomic_write_bytes

    atomic_write_bytes(path, json.dumps({"loss": losses}).encode())
