"""The one state directory: data, models, results, reports and Prefect's home live under it."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_ENV = "PD_STATE_DIR"


@dataclass(frozen=True)
class StateDir:
    """Paths inside the state directory (default `./.pd`, or `$PD_STATE_DIR`)."""

    root: Path

    @classmethod
    def resolve(cls, root: str | os.PathLike | None = None) -> "StateDir":
        root = root or os.environ.get(STATE_ENV) or ".pd"
        return cls(Path(root).expanduser().resolve())

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def db(self) -> Path:
        return self.results / "pd.duckdb"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def stage_dir(self, stage: str, key: str) -> Path:
        """Where a stage's output for one fingerprint lives (`data/ingest/<key>`, ...)."""
        base = {"ingest": self.data, "annotate": self.data, "prompts": self.data,
                "base": self.models, "train": self.models, "evaluate": self.results}[stage]
        return base / stage / key


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: the cache key of a stage."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


DONE_MARKER = "_DONE.json"


def is_done(stage_dir: Path) -> bool:
    return (stage_dir / DONE_MARKER).exists()


def mark_done(stage_dir: Path, summary: dict[str, Any]) -> None:
    """The last write of a stage: its presence means every other file of the stage is complete."""
    atomic_write_json(stage_dir / DONE_MARKER, summary)


def read_done(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / DONE_MARKER).read_text())
