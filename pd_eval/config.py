"""Typed configuration of benchmark generation and metrics."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pd_data.config import Frozen

POSITIVE_SUFFIX = ", best quality, extremely detailed"
NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, "
                   "fewer digits, cropped, worst quality, low quality")


class EvalConfig(Frozen):
    """`protocol='paper'`: DDIM 100 steps, guidance 9.0 over the text only, suffix and negative prompt of Table 1."""

    protocol: Literal["paper", "fast"] = "fast"
    scheduler: Literal["ddim", "dpm", "unipc"] = "ddim"
    steps: int = Field(10, ge=1)
    guidance_scale: float = Field(3.0, ge=1.0)
    map_guidance_scale: float | None = Field(
        None, ge=1.0, description="text guidance of the image->map tasks (task inference included); None is "
                                  "guidance_scale, as in the paper's protocol")
    pair_guidance_scale: float | None = Field(
        None, ge=1.0, description="Prompt Diffusion only: separate guidance over the example pair (pipeline docstring); "
                                  "None is the paper's text-only rule")
    batch_size: int = Field(16, ge=1)
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples for 95% intervals")
    unseen_per_task: int = Field(8, ge=2, description="prompts per unseen task (the first materialised ones)")
    task_inference_queries: int = Field(8, ge=0, description="queries x 3 forward tasks for in-context task inference; 0 is off")
    kid_subsets: int = Field(100, ge=1, description="KID: random subsets averaged (torchmetrics)")
    kid_subset_size: int = Field(1000, ge=2, description="KID: images per subset, clamped to the set size")
    seed: int = 0

    @model_validator(mode="after")
    def _applies(self) -> "EvalConfig":
        if self.protocol == "paper" and self.map_guidance_scale is not None:
            raise ValueError(f"eval.map_guidance_scale={self.map_guidance_scale} cannot apply under eval.protocol='paper', "
                             f"which samples every task at guidance 9; set protocol='fast' or leave it unset")
        return self

    def guidance_for(self, spec) -> float:
        """Text guidance of a task (a `TaskSpec`): `map_guidance_scale` for image->map when set."""
        return self.map_guidance_scale if spec.metric == "rmse" and self.map_guidance_scale is not None else self.guidance_scale

    def effective(self) -> "EvalConfig":
        """The protocol pins its own sampler settings; `fast` keeps what was configured."""
        if self.protocol == "paper":
            return self.model_copy(update={"scheduler": "ddim", "steps": 100, "guidance_scale": 9.0,
                                           "pair_guidance_scale": None})
        return self

    @property
    def positive_suffix(self) -> str:
        return POSITIVE_SUFFIX if self.protocol == "paper" else ""

    @property
    def negative_prompt(self) -> str:
        return NEGATIVE_PROMPT if self.protocol == "paper" else ""
