"""Typed configuration of the data stages (ingest, annotate, prompts)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Frozen(BaseModel):
    """Base of every config: immutable, and an unknown key is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Frozen):
    source: Literal["procedural"] = "procedural"
    n_groups: int = Field(24, ge=2, description="prompt groups (each a set of edited twins)")
    images_per_group: int = Field(2, ge=2, le=8)
    resolution: int = Field(32, ge=16, le=1024)
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    shard_size: int = Field(64, ge=1, description="rows per Parquet shard")
    modalities: tuple[str, ...] = ("depth", "hed", "seg")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions={self.split_fractions} must be >= 0 and sum to 1")
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 8")
        return self


class PromptConfig(Frozen):
    """How the evaluation prompts are materialised (identical for every model under test)."""

    per_task: int = Field(4, ge=1, description="evaluation prompts per task")
    split: Literal["train", "val", "test"] = "test"
    seed: int = 1234
