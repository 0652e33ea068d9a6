"""The text-to-image base model: Stable Diffusion 1.5 (loaded) or a tiny stand-in (trained here).

Both live in the diffusers folder layout (`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`,
and `vae/` for latent models), and both go through `load_base`. The tiny base works in pixel space:
at 32-64 px there is nothing for a VAE to compress, no VAE has to be trained first, and the
ControlNet hint encoders need no downsampling (conditioning stack of length 1).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast

from pd_model.config import BaseModelConfig

SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


@dataclass
class BaseModel:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerFast | CLIPTokenizer
    scheduler: SchedulerMixin
    vae: AutoencoderKL | None = None

    def with_unet(self, unet: UNet2DConditionModel | None) -> "BaseModel":
        """This base with a model's own UNet (trained with train.train_unet_decoder); itself for None."""
        return self if unet is None else replace(self, unet=unet)

    def freeze(self) -> "BaseModel":
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.requires_grad_(False).eval()
        return self

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(B,) strings -> (B, T, D) hidden states of the frozen text encoder."""
        tok = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return self.text_encoder(tok.input_ids)[0]

    def to_model_space(self, images: torch.Tensor,
                       generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> what the UNet denoises (latents with a VAE, pixels without).

        `generator` (one per image) makes the latent sample a function of the image's own seed."""
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.sample(generator=generator) * self.vae.config.scaling_factor

    def to_image_space(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae.config.scaling_factor).sample

    def save(self, path: Path) -> None:
        self.unet.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")


def build_tokenizer(captions: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the dataset's captions (the tiny base's stand-in for CLIP's BPE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=list(SPECIALS.values())))
    bos, eos = SPECIALS["bos_token"], SPECIALS["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **SPECIALS)


def build_tiny_base(cfg: BaseModelConfig, captions: list[str], resolution: int) -> BaseModel:
    """A randomly initialised pixel-space base, sized by the profile; the seed fixes its weights.

    Its vocabulary holds the words of `captions` and of every task's fixed text ("depth map", ...):
    built from captions alone, the four forward-task texts were all [unknown, unknown] and told the
    model nothing about the task."""
    from pd_data.tasks import TASKS

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(list(captions) + sorted({t.fixed_text for t in TASKS.values() if t.fixed_text}),
                                cfg.max_text_length)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=cfg.text_hidden_size * 4,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_hidden_size // 16),
        max_position_embeddings=cfg.max_text_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    n = len(cfg.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    unet = UNet2DConditionModel(
        sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, down_block_types=down,
        up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        cross_attention_dim=cfg.text_hidden_size, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=8)
    # Pixel-space DDPM: the cosine schedule suits small images better than SD's latent schedule.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              prediction_type=cfg.prediction_type)
    return BaseModel(unet, CLIPTextModel(text_cfg), tokenizer, scheduler)


def local_base_folder(path: str | Path) -> Path | None:
    """The local folder of a base reference: the folder itself, or its Hugging Face cache snapshot; None if neither."""
    from huggingface_hub import snapshot_download

    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # noqa: BLE001 - offline and not cached, or not a repo id at all
        return None


def load_base(path: str | Path) -> BaseModel:
    """Load a base in diffusers layout from a folder, or from the Hugging Face cache by repo id."""
    local = local_base_folder(path)
    if local is None:  # offline and not cached: say what is missing and where it goes
        raise FileNotFoundError(
            f"base model {str(path)!r} is neither a folder nor in the Hugging Face cache. Put a diffusers "
            f"Stable Diffusion 1.5 folder (unet/, text_encoder/, tokenizer/, scheduler/, vae/) there, or "
            f"pass base.pretrained_path=/path/to/stable-diffusion-v1-5")
    missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler") if not (local / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"base model folder {local} lacks {missing}; it must be in diffusers layout "
                                f"(unet/, text_encoder/, tokenizer/, scheduler/, optional vae/)")
    tok_dir = local / "tokenizer"
    tokenizer = (CLIPTokenizer.from_pretrained(tok_dir) if (tok_dir / "vocab.json").exists()
                 else PreTrainedTokenizerFast.from_pretrained(tok_dir))
    return BaseModel(
        unet=UNet2DConditionModel.from_pretrained(local / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(local / "text_encoder"),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler.from_pretrained(local / "scheduler"),
        vae=AutoencoderKL.from_pretrained(local / "vae") if (local / "vae").is_dir() else None,
    )
