"""The data layer's tables in the state directory's DuckDB file: every item ever seen in a live dataset
(`SourceItemRow`) and each round of its ingestion (`DataRoundRow`), registered with `pd_core.rows`."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pd_core.rows import Row, Schema, ensure_schema, register

__all__ = ["DataRoundRow", "SourceItemRow", "ensure_schema"]


@dataclass(frozen=True)
class SourceItemRow(Row):
    """One item ever seen in a live dataset; status: active | deleted (gone from the source) | rejected."""

    TABLE, KEY = "source_items", ("dataset", "image_id")
    dataset: str
    image_id: str
    content_hash: str
    round: int
    status: str
    first_seen: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class DataRoundRow(Row):
    TABLE, KEY = "data_rounds", ("dataset", "round")
    dataset: str
    round: int
    created_at: dt.datetime
    config_hash: str
    listed: int
    added: int
    changed: int
    unchanged: int
    deleted: int
    rejected: int
    annotated: int
    seconds: float


register(Schema("data", (SourceItemRow, DataRoundRow)))
