"""Sampling: one set of sampler settings (`Sampler`) for the evaluation, the base's samples, the
validation grids and `pd generate`; materialised prompts in, uint8 outputs out, through the pipeline."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import ControlNetModel

from pd_data.tasks import Prompt
from pd_model.base import BaseModel
from pd_model.config import Sampler
from pd_model.controlnet import kind_of
from pd_model.pipeline import PromptDiffusionPipeline, uint8_images


def generate(base: BaseModel, controlnet: ControlNetModel | None, prompts: list[Prompt], seeds: list[int],
             sampler: Sampler = Sampler(), *, empty_pair: bool = False) -> np.ndarray:
    """(B, H, W, 3) uint8 outputs; image i depends only on prompt i and seeds[i]. `empty_pair`: the
    Prompt Diffusion pair is zeroed, as the training dropout does (an ablation of the example).
    The pair and its settings are Prompt Diffusion's: the pipeline rejects a set one for any other model."""
    pipe = PromptDiffusionPipeline.from_parts(base, controlnet, sampler.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pair = None
    if controlnet is not None and kind_of(controlnet) == "prompt-diffusion":
        pair = ([p.example_source for p in prompts], [p.example_target for p in prompts])
    return uint8_images(pipe([p.text + sampler.positive_suffix for p in prompts], image_pair=pair,
                image=[p.query for p in prompts] if controlnet is not None else None,
                **sampler.pipeline_kwargs(), generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                output_type="pil", height=prompts[0].query.shape[0], width=prompts[0].query.shape[1],
                empty_pair=empty_pair).images)
