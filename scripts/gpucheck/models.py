"""Random-init models in Stable Diffusion 1.5's layout, at paper size or tiny, with the Prompt Diffusion
ControlNet the train stage copies from the UNet (`pd_model.train.build_controlnet`). No weights are read.

Paper size is SD 1.5's: UNet (320, 640, 1280, 1280), 2 layers per block, 768-d cross-attention; VAE
(128, 256, 512, 512), 8x, 4 latent channels; CLIP ViT-L/14's text tower (12 layers, 768-d, 77 tokens).
The tokenizer is the pipeline's word-level stand-in (`pd_model.base.build_tokenizer`): CLIP's BPE files
are weights too, and the token count (77) is what costs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT_TOKENS = 77
# Words the tokenizer knows: the tasks' fixed texts and what the synthetic prompts say.
WORDS = ["a photo of a red ball on a table", "depth map", "hed map", "segmentation map", "canny map",
         ", best quality, extremely detailed", "longbody, lowres, bad anatomy, bad hands, missing fingers, "
         "extra digit, fewer digits, cropped, worst quality, low quality"]


@dataclass(frozen=True)
class Size:
    """One model size: image side (latents are 8x smaller) and the networks' constructor arguments."""

    name: str
    resolution: int
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)


# UNet2DConditionModel's defaults are SD 1.5's but for the text width (1280 there, 768 in SD 1.5).
PAPER = Size("paper", 256, unet={"cross_attention_dim": 768},
             vae={"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2},
             text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "vocab_size": 49408})
TINY = Size("tiny", 64,
            unet={"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
                  "cross_attention_dim": 32, "attention_head_dim": 8,
                  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
            vae={"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
            text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2})


def sd_scheduler():
    """Stable Diffusion 1.5's training schedule (scaled-linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, steps_offset=1, prediction_type="epsilon")


def build_base(size: Size, device: str | torch.device, seed: int = 0):
    """A `pd_model.base.BaseModel` at random init: UNet and VAE built on `device`, the text encoder on
    the CPU (where the evaluation keeps it and training caches its embeddings)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pd_model.base import BaseModel, build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(WORDS, TEXT_TOKENS)
    levels = len(size.vae["block_out_channels"])
    with torch.device(device):  # initialised where they run: seconds, not a minute, at paper size
        unet = UNet2DConditionModel(sample_size=size.resolution // 8, **size.unet)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=size.resolution,
                            down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, **size.vae)
    text_cfg = CLIPTextConfig(**{"vocab_size": len(tokenizer), **size.text}, max_position_embeddings=TEXT_TOKENS,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    return BaseModel(unet, CLIPTextModel(text_cfg), tokenizer, sd_scheduler(), vae).freeze()


def build_controlnet(base):
    """The Prompt Diffusion ControlNet as the train stage builds it: the UNet's encoder copied, the 8x
    hint stack (16, 32, 96, 256) of a latent base, the query's own hint encoder."""
    from pd_model.train import build_controlnet as build

    return build(base, "prompt-diffusion")


def millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


def describe(base, controlnet) -> dict:
    """Parameter counts, in millions: what tells a paper-size model from a tiny one."""
    return {"unet_params_M": millions(base.unet), "controlnet_params_M": millions(controlnet),
            "vae_params_M": millions(base.vae), "text_encoder_params_M": millions(base.text_encoder)}
