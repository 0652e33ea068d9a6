"""Sampling with classifier-free guidance over the text; one generator per image."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import ControlNetModel, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from pd_data.tasks import Prompt
from pd_model.base import BaseModel
from pd_model.controlnet import PromptDiffusionControlNet
from pd_model.hints import to_uint8
from pd_model.train import TextCache, prompt_batch

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def make_scheduler(base: BaseModel, name: str):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(base.scheduler.config)


@torch.no_grad()
def generate(base: BaseModel, controlnet: ControlNetModel | None, prompts: list[Prompt], seeds: list[int], *,
             scheduler: str = "ddim", steps: int = 50, guidance_scale: float = 9.0, positive_suffix: str = "",
             negative_prompt: str = "", text_cache: TextCache | None = None) -> np.ndarray:
    """Outputs for a batch of prompts as (B, H, W, 3) uint8; image i depends only on prompt i and seeds[i]."""
    text_cache = text_cache or TextCache(base)
    sched = make_scheduler(base, scheduler)
    sched.set_timesteps(steps)
    b = len(prompts)
    cond = text_cache([p.text + positive_suffix for p in prompts])
    uncond = text_cache([negative_prompt] * b)
    emb = torch.cat([uncond, cond])  # guidance batched into one forward pass: (2B, T, D)
    h, w = prompts[0].query.shape[:2]
    scale = 1 if base.vae is None else 2 ** (len(base.vae.config.block_out_channels) - 1)
    shape = (base.unet.config.in_channels, h // scale, w // scale)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x = x * sched.init_noise_sigma
    hint_range = getattr(getattr(controlnet, "config", None), "hint_range", "-1,1")
    batch = prompt_batch(prompts, hint_range)
    pair, query = batch.pair, batch.query
    pair2, query2 = torch.cat([pair, pair]), torch.cat([query, query])
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        extra = {}
        if controlnet is not None:
            if isinstance(controlnet, PromptDiffusionControlNet):
                down, mid = controlnet(xin, t, emb, controlnet_cond=pair2, controlnet_query_cond=query2, return_dict=False)
            else:
                down, mid = controlnet(xin, t, emb, controlnet_cond=query2, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        eps_u, eps_c = base.unet(xin, t, emb, **extra).sample.chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = sched.step(eps, t, x).prev_sample
    return to_uint8(base.to_image_space(x)).numpy()
