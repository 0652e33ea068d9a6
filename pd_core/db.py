"""Connections to the state directory's DuckDB file, shared by every layer that keeps rows there (live
datasets in `pd_data`, results and the model registry in `pd_eval`).

DuckDB lets one process write a file at a time, so `connect` waits and retries while another holds
the lock; within one process (two flow runs in threads) connections take turns on a lock too, since
two connections altering the schema at once conflict. `connect` puts the state directory on
`file_search_path`, where relative globs resolve. `connect_confined` is the connection users' SQL runs
on (`pd sql`): read-only, confined to the state directory, its settings locked.
"""
from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import duckdb


def state_root(db: Path) -> Path:
    """The state directory of a database file: `<root>/results/pd.duckdb` (`pd_core.state.StateDir`)."""
    return Path(os.path.abspath(db)).parent.parent


def sql_text(s: str) -> str:
    """`s` for use inside a single-quoted SQL string."""
    return s.replace("'", "''")


def searchable(root: Path) -> bool:
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
    `file_search_path` is the state directory of `db`, where the data views' relative globs resolve.
    A read-only connection creates nothing: a missing `db` is a `FileNotFoundError`."""
    with _CONNECTIONS:
        with _connect(db, read_only, timeout_s) as con:
            yield con


# No extension is installed (a download) or loaded behind a query's back on a confined connection.
_NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                  "allow_community_extensions": False, "allow_unsigned_extensions": False}


@contextlib.contextmanager
def connect_confined(db: Path, allowed_paths: Iterable[str] = (),
                     timeout_s: float = 120.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection that reads files under the state directory of `db` and nowhere else, installs
    and loads no extension, and whose settings are locked, so that no `SET` undoes any of it.
    `allowed_paths` are further paths exactly as SQL names them: the data views' relative globs, which
    DuckDB checks as written (against the working directory) before `file_search_path` resolves them."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise FileNotFoundError("the working directory no longer exists, and DuckDB checks relative paths "
                                "against it; cd to a folder that exists and run the query again") from None
    with _CONNECTIONS:
        with _connect(db, True, timeout_s, _NO_EXTENSIONS) as con:
            root = state_root(db)
            dirs = sorted({str(root), os.path.realpath(root)})  # DuckDB compares paths as written
            con.execute(f"SET allowed_directories = {_sql_list(dirs)}")
            con.execute(f"SET allowed_paths = {_sql_list(allowed_paths)}")
            con.execute("SET enable_external_access = false")  # after the two lists: it freezes them
            con.execute("SET lock_configuration = true")
            yield con


def _sql_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{sql_text(i)}'" for i in items) + "]::VARCHAR[]"


@contextlib.contextmanager
def _connect(db: Path, read_only: bool, timeout_s: float,
             config: dict | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    if read_only and not db.exists():  # DuckDB would fail too, after we made its folder
        raise FileNotFoundError(f"no database at {db}")
    if not read_only:
        db.parent.mkdir(parents=True, exist_ok=True)
    deadline, delay = time.monotonic() + timeout_s, 0.05
    while True:
        try:
            con = duckdb.connect(str(db), read_only=read_only, config=config or {})
            break
        except (duckdb.IOException, duckdb.Error) as e:
            if not _is_lock_error(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 2.0)
    try:
        if searchable(root := state_root(db)):
            con.execute(f"SET file_search_path = '{sql_text(str(root))}'")
        yield con
    finally:
        con.close()
