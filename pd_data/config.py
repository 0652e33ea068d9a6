"""Typed configuration of the data stages (ingest, annotate, prompts)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pd_core.config import Frozen

Pairing = Literal["other-layout", "any", "other-group"]
PROCEDURAL_ONLY = ("n_groups", "layouts_per_group", "images_per_layout")  # no other source reads them
PARQUET_VIEW_KEYS = {"image": True, "caption": True, "group": False}  # key -> required


def check_parquet_views(views: list[dict[str, str]]) -> None:
    """A view maps these keys to columns; a key the source would not read is an error, not ignored."""
    for v in views:
        unknown = sorted(set(v) - set(PARQUET_VIEW_KEYS))
        missing = [k for k, required in PARQUET_VIEW_KEYS.items() if required and k not in v]
        if unknown or missing:
            what = f"unknown key(s) {unknown}" if unknown else f"no {missing[0]!r} key"
            raise ValueError(f"data.parquet_columns view {v} has {what}; the keys are 'image' and 'caption' and, "
                             f"optionally, 'group', each naming a column, e.g. "
                             f"{{\"image\": \"img\", \"caption\": \"text\", \"group\": \"album\"}}")
    groups = [v.get("group") for v in views]
    if len(set(groups)) > 1:
        raise ValueError(f"data.parquet_columns views name the group columns {groups}; a row's images are one layout, "
                         f"so one group: name the same group column in every view or in none")


# Settings read by some sources only: set for another, they are errors.
SOURCE_ONLY = {"source_path": ("folder", "instructpix2pix", "parquet"), "captions_file": ("folder",),
               "parquet_preset": ("parquet",), "parquet_columns": ("parquet",)}


def more_data(source: str | None) -> str:
    """How to give `source` more images, in settings that source reads (an error's fix); `None`
    (unknown, e.g. shards without a source column) names no setting rather than a wrong one."""
    if source == "procedural":
        return "raise data.n_groups or data.layouts_per_group"
    if source in SOURCE_ONLY["source_path"]:
        return f"add images to the {source} source at data.source_path"
    return "add images to the source"


class DataConfig(Frozen):
    source: Literal["procedural", "folder", "instructpix2pix", "parquet"] = "procedural"
    source_path: str | None = Field(None, description="folder / InstructPix2Pix root / Parquet file or folder")
    captions_file: str | None = Field(None, description="folder source: JSONL or CSV side file of captions")
    parquet_preset: Literal["instructpix2pix-hf"] | None = None
    parquet_columns: list[dict[str, str]] | None = Field(
        None, description='views of a row, e.g. [{"image": "img", "caption": "text"}]; an optional "group" column '
                          'groups the rows sharing its value (else each row is its own group)')
    n_groups: int = Field(12, ge=2, description="procedural groups (each one theme in several layouts)")
    layouts_per_group: int = Field(2, ge=1, le=8, description="procedural: layouts of a group's theme (as an InstructPix2Pix "
                                                              "folder's seeds are; that source reads its own)")
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
    workers: int = Field(1, ge=1, description="ingest and annotation processes; > 1 runs shards on a local Dask cluster")
    dask_address: str | None = Field(None, description="an existing Dask scheduler (e.g. tcp://10.0.0.5:8786): shards "
                                                       "run on its workers, which must import this project")
    gpu_workers: bool = Field(False, description="a local Dask cluster of one worker per visible GPU, each worker's "
                                                 "annotators on its own GPU")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.annotators)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        for key in PROCEDURAL_ONLY:
            if self.source != "procedural" and key in self.model_fields_set:
                raise ValueError(f"data.{key}={getattr(self, key)} cannot apply to data.source={self.source!r}: it sizes "
                                 f"the procedural source only ({self.source} data bring their own groups and layouts); "
                                 f"leave data.{key} unset")
        for key, sources in SOURCE_ONLY.items():
            if getattr(self, key) is not None and self.source not in sources:
                raise ValueError(f"data.{key}={getattr(self, key)!r} cannot apply to data.source={self.source!r}: only "
                                 f"the {' / '.join(sources)} source reads it; leave it unset or change data.source")
        if self.parquet_columns is not None:
            if self.parquet_preset is not None:
                raise ValueError(f"data.parquet_columns={self.parquet_columns} cannot apply with data.parquet_preset="
                                 f"{self.parquet_preset!r}, which maps the columns itself; set one of them")
            check_parquet_views(self.parquet_columns)
        if self.source != "procedural" and "procedural" in self.annotators.values():
            raise ValueError(f"data.annotators={self.annotators} uses 'procedural' maps, which only the procedural "
                             f"source has; choose controlnet_aux / transformers backends for source {self.source!r}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions={self.split_fractions} must be >= 0 and sum to 1")
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 8")
        self._check_cluster()
        return self

    def _check_cluster(self) -> None:
        """One way to size the shards' cluster: a local one of data.workers processes, one worker per GPU,
        or an existing cluster, which sizes itself."""
        if self.dask_address is not None and not self.dask_address.strip():
            raise ValueError("data.dask_address is empty; give the scheduler's address, e.g. tcp://10.0.0.5:8786, or leave it unset")
        given = [f"data.workers={self.workers}"] * (self.workers > 1) + ["data.gpu_workers=true"] * self.gpu_workers \
            + [f"data.dask_address={self.dask_address!r}"] * (self.dask_address is not None)
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} cannot apply together: each sizes the shards' cluster (a local one "
                             f"of data.workers processes, one worker per GPU, or an existing cluster, which has its own "
                             f"workers); set one")


class PromptConfig(Frozen):
    """How the evaluation prompts are materialised (identical for every model under test)."""

    per_task: int = Field(4, ge=1, description="evaluation prompts per task")
    split: Literal["train", "val", "test"] = "test"
    seed: int = 1234
