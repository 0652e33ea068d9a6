"""The denoising objective every training shares: text embeddings, batches, per-sample noise, the loss."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.training_utils import compute_snr

from pd_data.tasks import Prompt
from pd_model.base import BaseModel
from pd_model.config import TrainConfig
from pd_model.controlnet import residuals
from pd_model.hints import to_hint, to_unit


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


def draw_noise(gens: list[torch.Generator], shape: tuple[int, ...], num_timesteps: int,
               timesteps: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, *shape) noise and (B,) timesteps, sample i's from gens[i] only. `timesteps`: "uniform" over
    [0, T); "cubic", t = floor((1 - u^3) T) for uniform u (T2I-Adapter's sampling): most draws at high
    noise, where a sample's global look (a map or a picture, which map) is decided; "mixed": each
    sample cubic or uniform with even odds, so the low-noise steps that draw detail keep half their
    share."""
    if timesteps not in ("uniform", "cubic", "mixed"):
        raise ValueError(f"unknown timestep sampling {timesteps!r}; choose 'uniform', 'cubic' or 'mixed'")
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return noise, torch.stack([_timestep(g, num_timesteps, timesteps) for g in gens])


def _timestep(gen: torch.Generator, num_timesteps: int, timesteps: str) -> torch.Tensor:
    if timesteps == "mixed":
        coin = torch.rand((), generator=gen, dtype=torch.float64)
        timesteps = "cubic" if coin < 0.5 else "uniform"
    if timesteps == "uniform":
        return torch.randint(0, num_timesteps, (), generator=gen)
    u = torch.rand((), generator=gen, dtype=torch.float64)
    return ((1 - u ** 3) * num_timesteps).long().clamp_(0, num_timesteps - 1)


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
    pair = None if batch.pair is None else batch.pair.to(dev)
    query = None if batch.query is None else batch.query.to(dev)
    extra = residuals(controlnet, xt, t, emb, pair, query)
    pred = base.unet(xt, t, emb, **extra).sample
    v = base.scheduler.config.prediction_type == "v_prediction"
    target = base.scheduler.get_velocity(x0, noise, t) if v else noise
    if snr_gamma <= 0:
        return F.mse_loss(pred.float(), target.float())  # in fp32 under bf16 autocast too
    snr = compute_snr(base.scheduler, t)  # (B,) alpha_t^2 / sigma_t^2 = ab / (1 - ab)
    per_sample = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    return (per_sample * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v else snr)).mean()


def denoising_loss(base: BaseModel, batch: Batch, emb: torch.Tensor, gens: list[torch.Generator],
                   controlnet: ControlNetModel | None = None, snr_gamma: float = 0.0,
                   timesteps: str = "uniform") -> torch.Tensor:
    """`prediction_loss` with each sample's latent, noise and timestep (`draw_noise`) drawn from its own generator."""
    x0 = base.to_model_space(batch.target.to(base.unet.device), gens)
    noise, t = draw_noise(gens, tuple(x0.shape[1:]), base.scheduler.config.num_train_timesteps, timesteps)
    return prediction_loss(base, x0, noise, t, emb, batch, controlnet, snr_gamma)
