"""`PromptDiffusionPipeline`: in-context generation from (text, example pair, query), the diffusers way.

    pipe = PromptDiffusionPipeline.from_pretrained("<state>/models/train/<key>/prompt-diffusion")
    image = pipe("a red ball", image_pair=(source, target), image=query,
                 generator=torch.Generator().manual_seed(0)).images[0]

Every trained model folder is a diffusers pipeline folder (`save_trained`): `model_index.json`, the
trained `controlnet/`, the base's components (hard links to the base's files where the file system
allows, else copies) or the model's own `unet/`, and a DDIM `scheduler/`; `pipeline.json` beside them
records the base it came from, the ControlNet's kind and its tasks. `__call__` returns an
`ImagePipelineOutput` with diffusers' value ranges (`return_dict=False`: a tuple).

Guidance (one batched forward pass per step):
- text only (the paper's rule): eps = e(neg, pair) + s_text * (e(text, pair) - e(neg, pair));
- with `pair_guidance_scale` as well: eps = e(neg, 0) + s_pair * (e(neg, pair) - e(neg, 0))
  + s_text * (e(text, pair) - e(neg, pair)), where 0 is the dropped (zero) pair of training.
`guidance_scale=1` and no pair guidance runs the conditional branch alone. A stock ControlNet
(the CN(FT) baseline) works too: it sees the query only, so `image_pair`, `pair_guidance_scale` and
`empty_pair` are errors there, as they are without a ControlNet.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import (ControlNetModel, DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, ImagePipelineOutput,
                       UNet2DConditionModel, UniPCMultistepScheduler)
from PIL import Image

from pd_model.base import BaseModel
from pd_model.controlnet import as_kind, controlnet_class, kind_of, residuals
from pd_model.hints import to_hint, to_uint8

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ImageLike = Image.Image | np.ndarray


def uint8_images(images: list[Image.Image]) -> np.ndarray:
    """(B, H, W, 3) uint8 of the pipeline's PIL output: the exact pixels that a PNG of it holds."""
    return np.stack([np.asarray(im) for im in images])


def _uint8_batch(images: ImageLike | Sequence[ImageLike], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL or (H, W, 3) uint8 arrays -> (B, 3, H, W) uint8, resized to `size` (W, H) if given."""
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    arrs = []
    for im in images:
        pil = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))
        pil = pil.convert("RGB")
        if size is not None and pil.size != size:
            pil = pil.resize(size, Image.BICUBIC)
        arrs.append(np.asarray(pil))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (B, 3, H, W)


class PromptDiffusionPipeline(DiffusionPipeline):
    _optional_components = ["vae", "controlnet"]

    def __init__(self, unet, text_encoder, tokenizer, scheduler, controlnet=None, vae=None):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              controlnet=controlnet, vae=vae)

    @classmethod
    def from_parts(cls, base: BaseModel, controlnet: ControlNetModel | None, scheduler: str | None = None):
        pipe = cls(base.unet, base.text_encoder, base.tokenizer, base.scheduler, controlnet, base.vae)
        if scheduler is not None:
            pipe.set_scheduler(scheduler)
        return pipe

    def set_scheduler(self, name: str) -> None:
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
        self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config)

    @property
    def base(self) -> BaseModel:
        return BaseModel(self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.vae)

    @torch.no_grad()
    def encode_prompt(self, texts: list[str]) -> torch.Tensor:
        return self.base.encode_text(texts)  # (B, T, D)

    def _check(self, kind: str | None, image, image_pair, pair_guidance_scale, empty_pair) -> None:
        """Each setting that cannot apply to this pipeline's ControlNet is an error, never dropped."""
        is_pd = kind == "prompt-diffusion"
        if self.controlnet is not None and image is None:
            raise ValueError("a ControlNet needs the query: pass image=...")
        if image_pair is not None and not is_pd:
            raise ValueError("image_pair needs a PromptDiffusionControlNet; this pipeline's controlnet sees the query only")
        if is_pd and image_pair is None:
            raise ValueError("Prompt Diffusion needs image_pair=(example source, example target)")
        if not is_pd:
            has = "a stock ControlNet (CN(FT)), which sees the query only" if kind else "no ControlNet"
            for name, value, unset in (("pair_guidance_scale", pair_guidance_scale, None), ("empty_pair", empty_pair, False)):
                if value != unset:
                    raise ValueError(f"{name}={value} cannot apply: it acts on the example pair of a Prompt Diffusion "
                                     f"ControlNet and this pipeline has {has}; leave {name}={unset}")

    def _hints(self, image, image_pair, b: int, empty_pair: bool, height, width):
        """(query, pair, (width, height)): the hints in the ControlNet's range, batch b; the query sets the size."""
        query_u8 = _uint8_batch(image)
        size = (query_u8.shape[3], query_u8.shape[2])
        for name, value, own in (("height", height, size[1]), ("width", width, size[0])):
            if value is not None and value != own:
                raise ValueError(f"{name}={value} cannot apply: the output has the query image's size "
                                 f"({size[0]}x{size[1]}, width x height); resize the query or leave {name}=None")
        hint_range = getattr(self.controlnet.config, "hint_range", "-1,1")
        query, pair = to_hint(query_u8, hint_range), None
        if image_pair is not None:
            src, tgt = (_uint8_batch(im, size) for im in image_pair)
            pair = torch.cat([to_hint(src, hint_range), to_hint(tgt, hint_range)], 1)  # (B, 6, H, W)
            pair = torch.zeros_like(pair) if empty_pair else pair
        if query.shape[0] == 1 and b > 1:
            query = query.expand(b, -1, -1, -1)
            pair = pair.expand(b, -1, -1, -1) if pair is not None else None
        return query, pair, size

    def _branches(self, prompts, negatives, pair, use_text: bool, use_pair: bool):
        """Text embeddings and pairs of the guidance branches, batched: [neg + zero pair] [neg + pair] [text + pair]."""
        cond = self.encode_prompt(prompts)
        neg = self.encode_prompt(negatives) if (use_text or use_pair) else None
        embs, pairs = [], []
        if use_pair:
            embs.append(neg)
            pairs.append(torch.zeros_like(pair))
        if use_text or use_pair:
            embs.append(neg)
            pairs.append(pair)
        embs.append(cond)
        pairs.append(pair)
        return embs, (torch.cat(pairs) if pair is not None else None)

    @staticmethod
    def _guided(parts, guidance_scale: float, pair_guidance_scale: float | None):
        """The guided noise prediction from the branches' predictions (module docstring)."""
        if pair_guidance_scale is not None:
            e0, e_pair, e_text = parts
            return e0 + pair_guidance_scale * (e_pair - e0) + guidance_scale * (e_text - e_pair)
        if len(parts) == 2:
            e_neg, e_text = parts
            return e_neg + guidance_scale * (e_text - e_neg)
        return parts[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image_pair: tuple | None = None, image: ImageLike | Sequence[ImageLike] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 9.0, pair_guidance_scale: float | None = None,
                 negative_prompt: str | list[str] = "", num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, height: int | None = None, width: int | None = None, empty_pair: bool = False,
                 controlnet_conditioning_scale: float = 1.0,
                 callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)):
        """`ImagePipelineOutput(images)` (or `(images,)` with `return_dict=False`), as diffusers' pipelines
        return: a list of PIL images (`output_type='pil'`), a (B, H, W, 3) float array in [0, 1] ('np'), a
        (B, 3, H, W) float tensor in [0, 1] ('pt') or the denoised latents / pixels ('latent'). B is the
        number of prompts times `num_images_per_prompt`; with a list of generators, one per output image.

        `empty_pair=True` feeds the pair as zeros in the hint space (training's dropped pair): what the model
        does with no example at all. `controlnet_conditioning_scale` multiplies the ControlNet's residuals.
        `callback_on_step_end(pipe, i, t, {"latents": x})` runs after each step; a `latents` it returns
        replaces the current ones. `height` / `width` size an output without a query; with one, the output
        has the query's size."""
        self._check_call(output_type, num_images_per_prompt, callback_on_step_end_tensor_inputs,
                         controlnet_conditioning_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; pass one string or one per prompt")
        k = num_images_per_prompt
        prompts, negatives = [p for p in prompts for _ in range(k)], [n for n in negatives for _ in range(k)]
        b = len(prompts)
        self._check(None if self.controlnet is None else kind_of(self.controlnet), image, image_pair, pair_guidance_scale,
                    empty_pair)
        query = pair = size = None
        if image is not None:
            query, pair, size = self._hints(image, image_pair, b // k, empty_pair, height, width)
            query = query.repeat_interleave(k, 0)
            pair = pair.repeat_interleave(k, 0) if pair is not None else None
        h = size[1] if size else (height or self.unet.config.sample_size * self._scale)
        w = size[0] if size else (width or self.unet.config.sample_size * self._scale)
        embs, pair_all = self._branches(prompts, negatives, pair, guidance_scale != 1.0, pair_guidance_scale is not None)
        n = len(embs)
        dev = self.unet.device  # the text encoder may stay on the CPU (training keeps it there)
        emb = torch.cat(embs).to(dev)  # (n * B, T, D)
        pair_all = pair_all.to(dev) if pair_all is not None else None
        query_all = torch.cat([query] * n).to(dev) if query is not None else None
        x = self._initial_noise(generator, b, k, h, w).to(dev) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            xin = self.scheduler.scale_model_input(torch.cat([x] * n), t)
            extra = residuals(self.controlnet, xin, t, emb, pair_all, query_all, controlnet_conditioning_scale)
            eps_all = self.unet(xin, t, emb, **extra).sample
            x = self.scheduler.step(self._guided(eps_all.chunk(n), guidance_scale, pair_guidance_scale), t, x).prev_sample
            if callback_on_step_end is not None:
                x = (callback_on_step_end(self, i, t, {"latents": x}) or {}).get("latents", x)
        images = self._decode(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _check_call(self, output_type: str, num_images_per_prompt: int, tensor_inputs: Sequence[str],
                    conditioning_scale: float) -> None:
        """The call's settings that cannot apply, each an error naming it, before any work."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt}; it must be at least 1")
        unknown = set(tensor_inputs) - {"latents"}
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} cannot apply; this pipeline passes ['latents']")
        if conditioning_scale != 1.0 and self.controlnet is None:
            raise ValueError(f"controlnet_conditioning_scale={conditioning_scale} cannot apply: this pipeline "
                             f"has no ControlNet; leave it at 1.0")

    def _initial_noise(self, generator, b: int, k: int, h: int, w: int) -> torch.Tensor:
        """(b, C, h, w) noise on the CPU, one generator per image, so an image never depends on its batch."""
        gens = generator if isinstance(generator, list) else [generator] * b
        if len(gens) != b:
            raise ValueError(f"{len(gens)} generators for {b} images ({b // k} prompts x num_images_per_prompt={k}); "
                             f"pass one generator or one per image")
        shape = (self.unet.config.in_channels, h // self._scale, w // self._scale)
        return torch.stack([torch.randn(shape, generator=g) for g in gens])

    def _decode(self, x: torch.Tensor, output_type: str):
        """The denoised latents as `output_type` asks: PIL images, a [0, 1] array or tensor, or `x` itself."""
        if output_type == "latent":
            return x
        images = self.base.to_image_space(x)  # [-1, 1]
        if output_type == "pil":
            return [Image.fromarray(a) for a in to_uint8(images.cpu()).numpy()]
        images = (images / 2 + 0.5).clamp(0, 1).float()
        return images.cpu().permute(0, 2, 3, 1).numpy() if output_type == "np" else images

    @classmethod
    def from_trained(cls, model_dir: str | Path, scheduler: str | None = "ddim") -> "PromptDiffusionPipeline":
        """A trained model folder (`<state>/models/train/<key>/<name>`), frozen, with `scheduler` (None: the
        folder's). Folders written before models were pipeline folders load through their `pipeline.json`."""
        from pd_model.base import load_base

        model_dir = Path(model_dir)
        if (model_dir / "model_index.json").exists():
            pipe = cls.from_pretrained(model_dir)
            pipe.base.freeze()
            if pipe.controlnet is not None:
                pipe.controlnet.eval().requires_grad_(False)
        else:  # a folder of the layout before pipeline folders: `pipeline.json` names the base
            meta, controlnet, unet = load_trained(model_dir)
            pipe = cls.from_parts(load_base(meta["base"]).with_unet(unet).freeze(), controlnet)
        if scheduler is not None:
            pipe.set_scheduler(scheduler)
        return pipe

    @property
    def _scale(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)


def save_trained(out: Path, controlnet: ControlNetModel, base: BaseModel, base_ref: str, kind: str,
                 tasks: tuple[str, ...], with_unet: bool) -> None:
    """A trained model folder, which `PromptDiffusionPipeline.from_pretrained(out)` loads: `controlnet/`,
    `unet/` (the model's own when the decoder was trained too), the base's other components, a DDIM
    `scheduler/` (the evaluation's sampler), `model_index.json`, and `pipeline.json` (the base reference,
    the ControlNet's `kind` in the current vocabulary, whichever spelling `kind` uses, and its tasks).

    The frozen components are hard links to the base folder's files where `base_ref` is one on this file
    system (no disk for SD 1.5's 4 GB per model), else copies, else saved from `base`."""
    from pd_core.state import atomic_write_json
    from pd_model.base import local_base_folder

    kind = as_kind(kind)
    if kind != kind_of(controlnet):
        raise ValueError(f"kind={kind!r} but the ControlNet is a {kind_of(controlnet)!r} one; pass kind={kind_of(controlnet)!r}")
    out = Path(out)
    controlnet.save_pretrained(out / "controlnet")
    meta = {"base": base_ref, "kind": kind, "tasks": list(tasks)}
    source = local_base_folder(base_ref)
    frozen = {"text_encoder": base.text_encoder, "tokenizer": base.tokenizer, "vae": base.vae}
    if with_unet:  # the decoder was trained too: the model is this UNet + the ControlNet
        base.unet.save_pretrained(out / "unet")
        meta["unet"] = "unet"
    else:
        frozen["unet"] = base.unet
    for name, module in frozen.items():
        if module is not None:
            _link_or_save(source / name if source else None, module, out / name)
    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    scheduler.save_pretrained(out / "scheduler")
    pipe = PromptDiffusionPipeline(base.unet, base.text_encoder, base.tokenizer, scheduler, controlnet, base.vae)
    pipe.save_config(out)  # model_index.json: each component's (library, class), as save_pretrained writes it
    atomic_write_json(out / "pipeline.json", meta)


def _link_or_save(source: Path | None, module, dest: Path) -> None:
    """`dest` as a tree of hard links to `source`'s files (copies across file systems), or saved from
    `module` when there is no such source folder."""
    if source is None or not source.is_dir():
        module.save_pretrained(dest)
        return
    if dest.exists():
        shutil.rmtree(dest)
    for f in sorted(source.rglob("*")):
        target = dest / f.relative_to(source)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(f, target)


def load_trained(model_dir: str | Path) -> tuple[dict, ControlNetModel, UNet2DConditionModel | None]:
    """(pipeline.json, its ControlNet, its own UNet or None) of a folder written by `save_trained`."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "pipeline.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found; pass a model folder written by the train stage "
                                f"(it holds controlnet/ and pipeline.json)")
    meta = json.loads(meta_path.read_text())
    controlnet = controlnet_class(meta["kind"]).from_pretrained(model_dir / "controlnet").eval()
    unet = UNet2DConditionModel.from_pretrained(model_dir / meta["unet"]).eval().requires_grad_(False) if meta.get("unet") else None
    return meta, controlnet, unet
