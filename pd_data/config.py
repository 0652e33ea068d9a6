"""Typed configuration of the data stages (ingest, annotate, prompts)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Pairing = Literal["other-layout", "any", "other-group"]


class Frozen(BaseModel):
    """Base of every config: immutable, and an unknown key is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Frozen):
    source: Literal["procedural", "folder", "instructpix2pix", "parquet"] = "procedural"
    source_path: str | None = Field(None, description="folder / InstructPix2Pix root / Parquet file or folder")
    captions_file: str | None = Field(None, description="folder source: JSONL or CSV side file of captions")
    parquet_preset: Literal["instructpix2pix-hf"] | None = None
    parquet_columns: list[dict[str, str]] | None = Field(None, description='e.g. [{"image": "img", "caption": "text"}]')
    n_groups: int = Field(12, ge=2, description="procedural groups (each one theme in several layouts)")
    layouts_per_group: int = Field(2, ge=1, le=8, description="procedural: layouts of a group's theme (an InstructPix2Pix folder's seeds)")
    images_per_layout: int = Field(2, ge=1, le=8, description="procedural: a layout and its edited twins")
    pairing: Pairing = Field("other-layout", description=(
        "where a prompt's example pair comes from, in training and evaluation: 'other-layout' (another layout "
        "of the query's group), 'any' (any other image of the group, twins included: the original's draw), "
        "'other-group' (another group); a query whose group has no such image takes it from another group"))
    resolution: int = Field(32, ge=16, le=1024)
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    shard_size: int = Field(64, ge=1, description="rows per Parquet shard")
    # modality -> annotator backend ("procedural" exact maps need the procedural source). The last
    # three feed only the unseen (never trained) tasks of the evaluation.
    annotators: dict[str, str] = Field(default_factory=lambda: {
        m: "procedural" for m in ("depth", "hed", "seg", "canny", "scribble", "normal")})
    annotator_weights: str | None = Field(None, description="folder of annotator weights (else $PD_ANNOTATOR_WEIGHTS or the HF cache)")
    min_side: int = Field(16, ge=1, description="smaller images are rejected")
    max_pixels: int = Field(50_000_000, ge=1, description="larger images are rejected as decompression bombs")
    workers: int = Field(1, ge=1, description="annotation processes; > 1 runs shards on a Dask cluster")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.annotators)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source != "procedural" and "procedural" in self.annotators.values():
            raise ValueError(f"data.annotators={self.annotators} uses 'procedural' maps, which only the procedural "
                             f"source has; choose controlnet_aux / transformers backends for source {self.source!r}")
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
