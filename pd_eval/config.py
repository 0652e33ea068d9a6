"""Typed configuration of benchmark generation and metrics."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pd_core.config import Frozen
from pd_model.config import Sampler

POSITIVE_SUFFIX = ", best quality, extremely detailed"
NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, "
                   "fewer digits, cropped, worst quality, low quality")


# The paper's sampler (Table 1): what `protocol='paper'` holds, so what is hashed is what samples.
PAPER_SAMPLER = {"scheduler": "ddim", "steps": 100, "guidance_scale": 9.0, "pair_guidance_scale": None}
# What the paper's protocol decides; a profile's own values of these give way to it (flows.profiles).
PROTOCOL_KEYS = (*PAPER_SAMPLER, "map_guidance_scale")


def _typed(v) -> str:
    """A value as `-o eval.key=VALUE` takes it (JSON where it differs from the text: null)."""
    return "null" if v is None else str(v)


class EvalConfig(Frozen):
    """`protocol='paper'`: DDIM 100 steps, guidance 9.0 over the text only, suffix and negative prompt of Table 1."""

    protocol: Literal["paper", "fast"] = "fast"
    scheduler: Literal["ddim", "dpm", "unipc"] = Sampler.scheduler
    steps: int = Field(Sampler.steps, ge=1, description="the fastest count no worse than DDIM 100 on any demo task "
                                              "(scripts/bench_eval.py samplers; docs/results.md)")
    guidance_scale: float = Field(Sampler.guidance_scale, ge=1.0)
    map_guidance_scale: float | None = Field(
        None, ge=1.0, description="text guidance of the image->map tasks (task inference included); None is "
                                  "guidance_scale, as in the paper's protocol")
    pair_guidance_scale: float | None = Field(
        None, ge=1.0, description="Prompt Diffusion only: separate guidance over the example pair (pipeline docstring); "
                                  "None is the paper's text-only rule")
    batch_size: int = Field(16, ge=1, description="samples per generation batch; part of the key (a batch's "
                                                  "composition can move a pixel by one level)")
    processes: int = Field(1, ge=1, description="generation processes (torchrun; one GPU each on CUDA); the PNGs do "
                                                "not depend on it")
    threads: int = Field(1, ge=1, description="CPU threads of each generation process; part of the key: on a CPU the "
                                              "float sums, and so a pixel, depend on it (use eval.processes to use more cores)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible")
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples for 95% intervals")
    unseen_per_task: int = Field(8, ge=2, description="prompts per unseen task (the first materialised ones)")
    sensitivity_per_task: int = Field(16, ge=0, description="example sensitivity: the first prompts of each trained task "
                                      "sampled again with the pair zeroed and with another task's pair (every unseen "
                                      "prompt is); 0 runs it on the unseen tasks only, with the pair zeroed")
    task_inference_queries: int = Field(8, ge=0, description="queries x 3 forward tasks for in-context task inference; 0 is off")
    reader_steps: int = Field(600, ge=1, description="training steps of the demo's re-annotator (pd_eval.reader), which "
                                                     "reads map->image outputs back for controllability")
    kid_subsets: int = Field(100, ge=1, description="KID: random subsets averaged (torchmetrics)")
    kid_subset_size: int = Field(1000, ge=2, description="KID: images per subset, clamped to the set size")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _paper_sampler(cls, data):
        """Under the paper's protocol an unset sampler setting is the paper's (checked after parsing)."""
        if isinstance(data, dict) and data.get("protocol") == "paper":
            return {**PAPER_SAMPLER, **data}
        return data

    @model_validator(mode="after")
    def _applies(self) -> "EvalConfig":
        if self.protocol != "paper":
            return self
        # Unset ones are the paper's already: a difference was given. Every one in one message, each
        # with the value that agrees, so that one fix is one -o.
        wrong = [(k, getattr(self, k), v) for k, v in (*PAPER_SAMPLER.items(), ("map_guidance_scale", None))
                 if getattr(self, k) != v]
        if wrong:
            raise ValueError("\n".join(
                f"eval.{k}={_typed(have)} cannot apply under eval.protocol=paper, which samples every task with DDIM "
                f"100 steps at guidance 9 over the text only; use eval.{k}={_typed(paper)} or eval.protocol=fast"
                for k, have, paper in wrong))
        return self

    def sampler(self) -> Sampler:
        """The sampler of the map->image prompts (image->map ones take `map_guidance_scale` where set)."""
        return Sampler(self.scheduler, self.steps, self.guidance_scale, self.pair_guidance_scale, self.negative_prompt,
                       self.positive_suffix)

    def identity(self) -> dict:
        """The settings an evaluation's outputs depend on (its key): all but how many processes share it,
        with `device='auto'` resolved (a GPU's PNGs are not a CPU's)."""
        import torch

        out = self.model_dump(exclude={"processes"})
        if out["device"] == "auto":
            out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        return out

    def guidance_for(self, spec) -> float:
        """Text guidance of a task (a `TaskSpec`): `map_guidance_scale` for image->map when set."""
        return self.map_guidance_scale if spec.metric == "rmse" and self.map_guidance_scale is not None else self.guidance_scale

    @property
    def positive_suffix(self) -> str:
        return POSITIVE_SUFFIX if self.protocol == "paper" else ""

    @property
    def negative_prompt(self) -> str:
        return NEGATIVE_PROMPT if self.protocol == "paper" else ""
