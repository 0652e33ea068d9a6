"""Connections to the state directory's DuckDB file, shared by the data layer (live datasets) and the
results store (`pd_eval.store`): it lives here so that pd_data never imports pd_eval.

DuckDB lets one process write a file at a time, so `connect` waits and retries while another holds
the lock; within one process (two flow runs in threads) connections take turns on a lock too, since
two connections altering the schema at once conflict. `connect` puts the state directory on
`file_search_path`, where relative globs resolve.
"""
from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Iterator

import duckdb


def state_root(db: Path) -> Path:
    """The state directory of a database file: `<root>/results/pd.duckdb` (`pd_data.state.StateDir`)."""
    return Path(os.path.abspath(db)).parent.parent


def _sql_text(s: str) -> str:
    """`s` for use inside a single-quoted SQL string."""
    return s.replace("'", "''")


def _searchable(root: Path) -> bool:
    return "," not in str(root)  # file_search_path is a comma-separated list, with no quoting


def _is_lock_error(e: Exception) -> bool:
    text = str(e).lower()
    return "lock" in text or "conflicting" in text or "being used" in text


# One connection per process at a time (threads take turns), as the file lock makes writers do across
# processes: DuckDB refuses a read-only and a read-write connection to one file in one process.
_CONNECTIONS = threading.RLock()


@contextlib.contextmanager
def connect(db: Path, read_only: bool = False, timeout_s: float = 120.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection; waits (with jitter) while another process holds the write lock. Its
    `file_search_path` is the state directory of `db`, where the data views' relative globs resolve."""
    with _CONNECTIONS:
        with _connect(db, read_only, timeout_s) as con:
            yield con


@contextlib.contextmanager
def _connect(db: Path, read_only: bool, timeout_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    db.parent.mkdir(parents=True, exist_ok=True)
    deadline, delay = time.monotonic() + timeout_s, 0.05
    while True:
        try:
            con = duckdb.connect(str(db), read_only=read_only)
            break
        except (duckdb.IOException, duckdb.Error) as e:
            if not _is_lock_error(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 2.0)
    try:
        if _searchable(root := state_root(db)):
            con.execute(f"SET file_search_path = '{_sql_text(str(root))}'")
        yield con
    finally:
        con.close()
