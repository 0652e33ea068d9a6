"""Results in DuckDB: runs, models, metrics, samples, task_inference (a confusion matrix); views
`paper_table`, `latest_paper_table`, `generalization` (unseen tasks by condition) and, over the
Parquet files, `images`, `annotations`, `rejects`, `splits` and `prompts`.

The data views name their shards relative to the state directory the database file sits in
(`<root>/results/pd.duckdb`, see `pd_data.state.StateDir`), and `connect` puts that directory on
DuckDB's `file_search_path`: a copied or moved state directory reads its own shards. Through
`connect` (and so `pd sql`), a relative glob in any query resolves under the state directory.

DuckDB lets one process write a file at a time. Writers here open a connection, write in one
transaction and close it at once; a writer that finds the file locked waits and retries, so two
flow runs finishing together both land their rows.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import time
from pathlib import Path
from typing import Iterator

import duckdb

from pd_data.tasks import UNSEEN_TASKS

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, profile VARCHAR, eval_id VARCHAR, started_at TIMESTAMP,
    finished_at TIMESTAMP, status VARCHAR, report_path VARCHAR, config JSON);
CREATE TABLE IF NOT EXISTS models (
    model_id VARCHAR, eval_id VARCHAR, kind VARCHAR, tasks VARCHAR[], path VARCHAR,
    train_steps INTEGER, final_loss DOUBLE, PRIMARY KEY (model_id, eval_id));
CREATE TABLE IF NOT EXISTS metrics (
    -- model_id: the Table 1 row ('prompt-diffusion', 'cn-ft': per-task checkpoints in models) or a
    -- baseline ('baseline/copy-example' on every task; 'baseline/copy-query', 'baseline/mean-map' on image->map)
    eval_id VARCHAR, model_id VARCHAR, task VARCHAR, metric VARCHAR, value DOUBLE, ci_low DOUBLE,
    ci_high DOUBLE, n INTEGER, feature_extractor VARCHAR, protocol VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (eval_id, model_id, task, metric));
CREATE TABLE IF NOT EXISTS samples (
    eval_id VARCHAR, model_id VARCHAR, task VARCHAR, prompt_id VARCHAR, path VARCHAR,
    PRIMARY KEY (eval_id, model_id, prompt_id));
CREATE TABLE IF NOT EXISTS task_inference (
    -- confusion matrix of in-context task inference: text removed, the pair shows shown_task, the
    -- output is nearest (RMSE) to the query's true map of predicted_task, or 'copied-example' when the
    -- example pair's target is at least as near; model_id 'baseline/copy-example' answers with that target
    eval_id VARCHAR, model_id VARCHAR, shown_task VARCHAR, predicted_task VARCHAR, count INTEGER,
    PRIMARY KEY (eval_id, model_id, shown_task, predicted_task));
CREATE TABLE IF NOT EXISTS paper_reference (
    model VARCHAR, "fid_depth->image" DOUBLE, "fid_hed->image" DOUBLE, "fid_seg->image" DOUBLE,
    "rmse_image->depth" DOUBLE, "rmse_image->hed" DOUBLE, "rmse_image->seg" DOUBLE);
"""
PAPER_ROWS = [("CN(FT) [paper]", 19.81, 13.07, 20.71, 0.20, 0.18, 0.36),
              ("Prompt Diffusion [paper]", 18.60, 13.35, 19.46, 0.21, 0.14, 0.31)]
TABLE1 = [("fid", "depth->image"), ("fid", "hed->image"), ("fid", "seg->image"),
          ("rmse", "image->depth"), ("rmse", "image->hed"), ("rmse", "image->seg")]
_cols = ",\n    ".join(f"max(value) FILTER (WHERE metric = '{m}' AND task = '{t}') AS \"{m}_{t}\"" for m, t in TABLE1)
VIEWS = f"""
CREATE OR REPLACE VIEW paper_table AS
SELECT r.run_id, r.profile, m.model_id AS model, max(NULLIF(m.feature_extractor, '')) AS feature_extractor,
    {_cols}
FROM runs r JOIN metrics m USING (eval_id)
WHERE (m.metric, m.task) IN ({", ".join(f"('{m}', '{t}')" for m, t in TABLE1)})
GROUP BY r.run_id, r.profile, m.model_id
UNION ALL BY NAME
SELECT NULL AS run_id, 'paper' AS profile, model, 'inception-v3' AS feature_extractor, * EXCLUDE (model)
FROM paper_reference;
CREATE OR REPLACE VIEW generalization AS
SELECT r.run_id, r.profile, m.task, m.model_id AS condition, m.metric, m.value, m.ci_low, m.ci_high, m.n,
    m.feature_extractor
FROM runs r JOIN metrics m USING (eval_id)
WHERE m.task IN ({", ".join(f"'{t}'" for t in UNSEEN_TASKS)});
CREATE OR REPLACE VIEW latest_paper_table AS
SELECT * FROM paper_table
WHERE run_id IS NULL OR run_id = (SELECT run_id FROM runs WHERE status = 'completed'
                                  ORDER BY finished_at DESC LIMIT 1);
"""


DATA_VIEWS = ("images", "annotations", "rejects", "prompts", "splits")


def state_root(db: Path) -> Path:
    """The state directory of a database file: `<root>/results/pd.duckdb` (`pd_data.state.StateDir`)."""
    return Path(os.path.abspath(db)).parent.parent


def _sql_text(s: str) -> str:
    """`s` for use inside a single-quoted SQL string."""
    return s.replace("'", "''")


def _searchable(root: Path) -> bool:
    return "," not in str(root)  # file_search_path is a comma-separated list, with no quoting


# The globs each data view reads, relative to the data root; a view is made once each has a file
# (`rejects`: once either has, reading those that do).
VIEW_GLOBS = {"images": ("ingest/*/images-*.parquet",),
              "annotations": ("annotate/*/annotations-*.parquet", "annotate/*/lineage.parquet"),
              "rejects": ("ingest/*/rejects-*.parquet", "annotate/*/rejects-*.parquet"),
              "prompts": ("prompts/*/prompts.parquet",), "splits": ("ingest/*/images-*.parquet",)}


def data_views_sql(data_root: Path | str, reject_globs: tuple[str, ...] = VIEW_GLOBS["rejects"]) -> dict[str, str]:
    """view name -> its CREATE statement, over the Parquet shards and the materialised evaluation prompts.
    `data_root` is written into the SQL as given: relative (to the state directory on `file_search_path`)
    or absolute; the `rejects` view reads `reject_globs`.

    Every path is a glob on purpose: DuckDB looks a relative glob up in `file_search_path` only, but a
    relative plain file in the working directory first. The globs are read at query time, so new shards
    show up (but each needs one matching file when the view is made). DuckDB reports `filename` as the
    absolute path it matched; the keys (`dataset`, `annotation_set`, `stage_key`, `prompt_set`) are
    taken from its last folder, so the state directory's own path cannot leak into them."""
    d = _sql_text(Path(data_root).as_posix())
    rejects = ", ".join(f"'{d}/{g}'" for g in reject_globs)
    return {
        "images": f"""CREATE OR REPLACE VIEW images AS
SELECT regexp_extract(filename, '/ingest/([^/]+)/[^/]+$', 1) AS dataset, * EXCLUDE (filename)
FROM read_parquet('{d}/ingest/*/images-*.parquet', filename = true, union_by_name = true)""",
        "annotations": f"""CREATE OR REPLACE VIEW annotations AS
SELECT l.dataset, a.* EXCLUDE (filename) FROM
    (SELECT *, regexp_extract(filename, '/annotate/([^/]+)/[^/]+$', 1) AS annotation_set
     FROM read_parquet('{d}/annotate/*/annotations-*.parquet', filename = true)) a
JOIN read_parquet('{d}/annotate/*/lineage.parquet') l USING (annotation_set)""",
        "rejects": f"""CREATE OR REPLACE VIEW rejects AS
SELECT regexp_extract(filename, '/(ingest|annotate)/([^/]+)/[^/]+$', 2) AS stage_key, * EXCLUDE (filename)
FROM read_parquet([{rejects}], filename = true, union_by_name = true)""",
        "prompts": f"""CREATE OR REPLACE VIEW prompts AS
SELECT regexp_extract(filename, '/prompts/([^/]+)/[^/]+$', 1) AS prompt_set, * EXCLUDE (filename)
FROM read_parquet('{d}/prompts/*/prompts.parquet', filename = true, union_by_name = true)""",
        "splits": """CREATE OR REPLACE VIEW splits AS
SELECT dataset, split, count(*) AS images, count(DISTINCT group_id) AS groups FROM images GROUP BY ALL""",
    }


def _view_data_root(db: Path, data_root: Path) -> str:
    """`data_root` relative to the state directory of `db` where it lies inside it, else absolute."""
    data, root = Path(os.path.abspath(data_root)), state_root(db)
    if _searchable(root):
        for r in (root, root.resolve()):
            if data.is_relative_to(r):
                return data.relative_to(r).as_posix()
    return data.as_posix()


def register_data_views(db: Path, data_root: Path) -> list[str]:
    """(Re)make the data views whose shards exist yet (the ingest stage's views before the prompts are
    drawn, say), and return their names. A `data_root` inside the state directory of `db` is stored
    relative to it, so the views move with the directory; one outside it is stored absolute."""
    present = {g for globs in VIEW_GLOBS.values() for g in globs if next(Path(data_root).glob(g), None) is not None}
    reject_globs = tuple(g for g in VIEW_GLOBS["rejects"] if g in present)
    made = [v for v in DATA_VIEWS if (reject_globs if v == "rejects" else set(VIEW_GLOBS[v]) <= present)]
    statements = data_views_sql(_view_data_root(db, data_root), reject_globs)
    with connect(db) as con:
        _ensure_schema(con)
        for v in made:
            con.execute(statements[v])
    return made


def _is_lock_error(e: Exception) -> bool:
    text = str(e).lower()
    return "lock" in text or "conflicting" in text or "being used" in text


@contextlib.contextmanager
def connect(db: Path, read_only: bool = False, timeout_s: float = 120.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection; waits (with jitter) while another process holds the write lock. Its
    `file_search_path` is the state directory of `db`, where the data views' relative globs resolve."""
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


def _ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA)
    if con.execute("SELECT count(*) FROM paper_reference").fetchall()[0][0] == 0:
        con.executemany("INSERT INTO paper_reference VALUES (?, ?, ?, ?, ?, ?, ?)", PAPER_ROWS)
    con.execute(VIEWS)


def init_db(db: Path) -> None:
    with connect(db) as con:
        _ensure_schema(con)


def write_rows(db: Path, table: str, rows: list[dict]) -> int:
    """Insert or replace rows (by primary key) in one transaction; returns the count."""
    if not rows:
        return 0
    cols = list(rows[0])
    sql = f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    with connect(db) as con:  # one connection: schema (idempotent) and rows
        _ensure_schema(con)
        con.execute("BEGIN")
        con.executemany(sql, [[r[c] for c in cols] for r in rows])
        con.execute("COMMIT")
    return len(rows)


def query(db: Path, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
    """Run a read-only query: (column names, rows)."""
    if not db.exists():
        raise FileNotFoundError(f"no results database at {db}; run a benchmark first (make benchmark)")
    with connect(db, read_only=True) as con:
        try:
            cur = con.execute(sql, params or [])
        except (duckdb.CatalogException, duckdb.IOException) as e:
            if (hint := _data_view_hint(e, db)) is None:
                raise
            raise type(e)(f"{e}\n{hint}") from e
        names = [d[0] for d in cur.description] if cur.description else []
        return names, cur.fetchall()


def _data_view_hint(e: duckdb.Error, db: Path) -> str | None:
    """What to do about a data view that was never made, or whose shards are gone; None otherwise."""
    text = str(e)
    if (m := re.search(r"with name (\w+) does not exist", text)) and m[1].lower() in DATA_VIEWS:
        return (f"the data views ({', '.join(DATA_VIEWS)}) are made when the pipeline's data stage "
                f"finishes; run it on this state directory first (make smoke or make benchmark)")
    if re.search(r'No files found that match the pattern "[^"]*(ingest|annotate|prompts)/\*/', text):
        return (f"the data views read their shards relative to the state directory {state_root(db)}, "
                f"whose data/ folder lacks them: copy or move the whole state directory, or rerun "
                f"the data stage there")
    return None


def format_table(names: list[str], rows: list[tuple], floatfmt: str = "{:.4g}") -> str:
    """A plain-text table for terminals."""
    def fmt(v) -> str:
        return "" if v is None else floatfmt.format(v) if isinstance(v, float) else str(v)

    cells = [names] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(names))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
