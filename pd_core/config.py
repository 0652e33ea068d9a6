"""The base of every typed config."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Base of every config: immutable, and an unknown key is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)
