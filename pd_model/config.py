"""Typed configuration of the networks and of training."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pd_data.config import Frozen


class BaseModelConfig(Frozen):
    """The text-to-image base. `kind='tiny'` is trained by the pipeline; `'sd15'` is loaded."""

    kind: Literal["tiny", "sd15"] = "tiny"
    pretrained_path: str | None = Field(None, description="diffusers folder or HF-cache repo id for kind='sd15'")
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden_size: int = 32
    text_layers: int = 2
    max_text_length: int = 24
    train_steps: int = Field(60, ge=0)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the weights (diffusers EMAModel); 0 is off")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "BaseModelConfig":
        if self.kind == "sd15" and not self.pretrained_path:
            raise ValueError("base.kind='sd15' needs base.pretrained_path (a diffusers folder of Stable Diffusion 1.5)")
        return self


class TrainConfig(Frozen):
    """Joint six-task Prompt Diffusion fine-tuning, and the CN(FT) baselines by the same loop."""

    steps: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    # Classifier-free guidance dropout, one uniform draw u per sample (paper section "Training").
    drop_text: float = 0.05
    drop_text_and_pair: float = 0.05
    drop_pair: float = 0.05
    train_unet_decoder: bool = Field(False, description="also train the UNet decoder (what the original's inverted --sd_locked did)")
    baseline_steps_per_task: int = Field(10, ge=0, description="CN(FT): equal steps per task; 0 skips baselines")
    oracles: bool = Field(False, description="also train a CN(FT) on each unseen task, at the CN(FT) budget: "
                                             "the oracle of the generalisation comparison (needs baselines on)")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up, then constant (the paper's lr)")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps (0: at the end only)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the trained weights (diffusers EMAModel); 0 is off")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.drop_text + self.drop_text_and_pair + self.drop_pair > 1:
            raise ValueError("the three dropout rates must sum to at most 1")
        if self.oracles and self.baseline_steps_per_task == 0:
            raise ValueError("train.oracles trains CN(FT) oracles at train.baseline_steps_per_task steps, which is 0; "
                             "set baseline_steps_per_task > 0 or oracles=false")
        return self
