"""The one state directory: data, models, results, reports and Prefect's home live under it."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

STATE_ENV = "PD_STATE_DIR"


class StateDirError(RuntimeError):
    """The state directory cannot be used (not writable)."""


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

    def require_writable(self) -> None:
        """One clear line, before any work, when the state directory cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as e:
            raise StateDirError(f"the state directory {self.root} is not writable ({e.strerror}); set "
                                f"{STATE_ENV} (or --state-dir) to a folder you can write") from None

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


@contextlib.contextmanager
def stage_lock(stage_dir: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock of one stage output (an advisory `flock` on a file beside it): a second run of the
    same stage waits here (after `on_wait()`), then finds the output done instead of computing it
    again. The lock is released when its holder exits, however it exits (a kill -9 included)."""
    lock = stage_dir.parent / f".{stage_dir.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_temporary(path: Path) -> bool:
    """A file or folder an atomic write leaves behind when it is killed (see `atomic_write_bytes`)."""
    return (path.name.startswith(".") and path.name.endswith(".tmp")) or path.name.startswith(".tmp-")


def remove_stale_temporaries(stage_dir: Path) -> int:
    """Delete what killed writes left in a stage's folder; call it holding the stage's lock. Returns the count."""
    if not stage_dir.is_dir():
        return 0
    stale = [p for p in stage_dir.rglob(".*") if is_temporary(p)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)
