"""Results in DuckDB: writing runs and evaluations (tables and views: `pd_eval.schema`), querying,
and the views over the Parquet files: `images`, `annotations`, `rejects`, `splits` and `prompts`.

The data views name their shards relative to the state directory the database file sits in
(`<root>/results/pd.duckdb`, see `pd_core.state.StateDir`), and `connect` puts that directory on
DuckDB's `file_search_path`: a copied or moved state directory reads its own shards. Through
`connect`, a relative glob in any query resolves under the state directory. Through `query` (and so
`pd sql`) DuckDB first checks a relative path against the working directory: the views' own globs are
let through by name, other relative paths only from inside the state directory; absolute paths under
it always read.

`query` is the read-only path, `pd sql`'s and the reports' alike: it runs only statements that read
(`READ_STATEMENTS`), on a connection (`connect_confined`) that opens the file read-only, reads files
under the state directory only, loads no extension and cannot change its own settings.

DuckDB lets one process write a file at a time. Writers here open a connection, write in one
transaction and close it at once; a writer that finds the file locked waits and retries, so two
flow runs finishing together both land their rows.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from pd_core.db import sql_text, searchable, connect, connect_confined, state_root
from pd_core.rows import Row
from pd_eval.schema import (ConfusionRow, MetricRow, ModelRow, ReplicateMetricRow, RunRow, SampleRow,
                             ensure_schema)

DATA_VIEWS = ("images", "annotations", "rejects", "prompts", "splits")


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
    taken from its last folder, so the state directory's own path cannot leak into them.

    `images` and `annotations` leave out the pixels (`image`, `map`): shards of older versions store
    them as raw bytes, newer ones as the Hugging Face Image struct, and DuckDB cannot union the two;
    read the pixels from the shards (`read_parquet` on one key's files, or `datasets`)."""
    d = sql_text(Path(data_root).as_posix())
    rejects = ", ".join(f"'{d}/{g}'" for g in reject_globs)
    return {
        "images": f"""CREATE OR REPLACE VIEW images AS
SELECT regexp_extract(filename, '/ingest/([^/]+)/[^/]+$', 1) AS dataset, * EXCLUDE (filename, image)
FROM read_parquet('{d}/ingest/*/images-*.parquet', filename = true, union_by_name = true)""",
        "annotations": f"""CREATE OR REPLACE VIEW annotations AS
SELECT l.dataset, a.* EXCLUDE (filename, map) FROM
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
    if searchable(root):
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
        ensure_schema(con)
        for v in made:
            con.execute(statements[v])
    return made


def init_db(db: Path) -> None:
    with connect(db) as con:
        ensure_schema(con)


class ReadOnlyError(ValueError):
    """A statement the read-only query path refuses to run."""


# What a query may be (`duckdb.extract_statements` types): DESCRIBE, SHOW, SUMMARIZE, FROM and VALUES parse
# as SELECT. EXPLAIN only of a SELECT, since EXPLAIN ANALYZE runs what it explains; PRAGMA only by name,
# since IMPORT DATABASE parses as one (and `PRAGMA x = y` as a SET).
READ_STATEMENTS = ("SELECT", "EXPLAIN", "PRAGMA")
READ_PRAGMAS = ("table_info", "show_tables", "show_tables_expanded", "database_list", "database_size",
                "storage_info", "version", "platform")
_EXPLAINED = re.compile(r"\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^()]*\)\s*)?(.*)", re.I | re.S)
_PRAGMA = re.compile(r"\s*PRAGMA\s+(\w+)\s*(?:\(|;|$)", re.I)


def _refusal(statement: duckdb.Statement) -> str | None:
    """The kind of `statement` if the read-only path refuses it (`COPY`, `PRAGMA import_database`, ...), else None."""
    kind = statement.type.name
    if kind == "EXPLAIN":
        inner = _explained(statement)
        if inner is None:
            return "EXPLAIN of an unreadable statement"
        return None if inner.type.name == "SELECT" else f"EXPLAIN of {_refusal(inner) or inner.type.name}"
    if kind == "PRAGMA":
        m = _PRAGMA.match(statement.query)
        return None if m and m[1].lower() in READ_PRAGMAS else f"PRAGMA {m[1]}" if m else "PRAGMA"
    return None if kind in READ_STATEMENTS else kind


def _explained(statement: duckdb.Statement) -> duckdb.Statement | None:
    """The one statement an EXPLAIN explains, or None where its text does not parse as one."""
    m = _EXPLAINED.match(statement.query)
    try:
        inner = duckdb.extract_statements(m[1]) if m else []
    except duckdb.Error:
        return None
    return inner[0] if len(inner) == 1 else None


def _head(statement: duckdb.Statement, width: int = 60) -> str:
    text = " ".join(statement.query.split()).rstrip(";")
    return text if len(text) <= width else text[:width - 3] + "..."


def read_statements(sql: str) -> list[duckdb.Statement]:
    """The statements of `sql`, every one of which reads; a `ReadOnlyError` names the first that does not."""
    statements = duckdb.extract_statements(sql)
    if not statements:
        raise ReadOnlyError("no SQL statement to run")
    for s in statements:
        if (kind := _refusal(s)) is not None:
            raise ReadOnlyError(f"refused {kind} statement `{_head(s)}`: the SQL shell is read-only (it runs "
                                f"SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN of a SELECT and PRAGMA table_info "
                                f"and the like: {', '.join(READ_PRAGMAS[1:])})")
    return statements


def data_view_paths(db: Path) -> list[str]:
    """The globs of the data views, exactly as their SQL names them (relative to the state directory)."""
    d = _view_data_root(db, state_root(db) / "data")
    return [f"{d}/{g}" for g in dict.fromkeys(g for globs in VIEW_GLOBS.values() for g in globs)]


def query(db: Path, sql: str, params: list | dict | None = None) -> tuple[list[str], list[tuple]]:
    """Run a read-only query: (column names, rows) of its last statement. Only statements that read run
    (`read_statements`), on a connection that can read the state directory and nothing else; a missing
    database is a `FileNotFoundError`, and nothing is created."""
    if not db.exists():
        raise FileNotFoundError(f"no results exist yet: {db} does not exist; run a benchmark first "
                                f"(make benchmark, or pd run --profile smoke) to create them")
    statements = read_statements(sql)
    with connect_confined(db, data_view_paths(db)) as con:
        try:
            for s in statements[:-1]:
                con.execute(s)
            cur = con.execute(statements[-1], params or [])
        except (duckdb.CatalogException, duckdb.IOException, duckdb.PermissionException) as e:
            if (hint := _data_view_hint(e, db)) is None:
                raise
            raise type(e)(f"{e}\n{hint}") from e
        names = [d[0] for d in cur.description] if cur.description else []
        return names, cur.fetchall()


def _data_view_hint(e: duckdb.Error, db: Path) -> str | None:
    """What to do about a data view that was never made, whose shards are gone, or a file outside the state
    directory; None otherwise."""
    text = str(e)
    if (m := re.search(r"with name (\w+) does not exist", text)) and m[1].lower() in DATA_VIEWS:
        return (f"the data views ({', '.join(DATA_VIEWS)}) are made when the pipeline's data stage "
                f"finishes; run it on this state directory first (make smoke or make benchmark)")
    if re.search(r'No files found that match the pattern "[^"]*(ingest|annotate|prompts)/\*/', text):
        return (f"the data views read their shards relative to the state directory {state_root(db)}, "
                f"whose data/ folder lacks them: copy or move the whole state directory, or rerun "
                f"the data stage there")
    if isinstance(e, duckdb.PermissionException):
        return (f"the SQL shell reads files under the state directory {state_root(db)} only (a relative path "
                f"counts from the working directory: name files by their absolute path, or query the data views)")
    return None


def format_rows(names: list[str], rows: list[tuple], fmt: str) -> str:
    """`names`/`rows` as an aligned table (`fmt='table'`), a JSON list of objects or CSV with a header."""
    if fmt == "table":
        return format_table(names, rows)
    if fmt == "json":
        import json
        import math
        from decimal import Decimal

        def plain(v):  # DuckDB's DECIMAL as a number, dates and the rest as their text
            return float(v) if isinstance(v, Decimal) else v.isoformat() if hasattr(v, "isoformat") else str(v)

        def finite(v):  # JSON has no NaN: an interval of one sample is null
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return json.dumps([{k: finite(v) for k, v in zip(names, r)} for r in rows], indent=2, default=plain)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(names)
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")
    raise ValueError(f"unknown format {fmt!r}; choose table, json or csv")


def format_table(names: list[str], rows: list[tuple], floatfmt: str = "{:.4g}") -> str:
    """A plain-text table for terminals."""
    def fmt(v) -> str:
        return "" if v is None else floatfmt.format(v) if isinstance(v, float) else str(v)

    cells = [names] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(names))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


BENCHMARK_MODEL_COLUMNS = ("name", "kind", "path", "steps", "final_loss")


def benchmark_models(db: Path) -> tuple[dict | None, list[str], list[tuple]]:
    """The latest completed benchmark run (run_id, profile, finished_at) and the models it scored: name,
    kind, path, steps, final loss. It only reads: no database or no completed run is (None, columns, [])."""
    if not db.exists():
        return None, list(BENCHMARK_MODEL_COLUMNS), []
    with connect(db, read_only=True) as con:
        have = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
                                          " AND schema_name = 'main'").fetchall()}
        if not {"models", "runs"} <= have:
            return None, list(BENCHMARK_MODEL_COLUMNS), []
        cur = con.execute("SELECT run_id, profile, finished_at, eval_id FROM runs WHERE status = 'completed' "
                          "ORDER BY finished_at DESC LIMIT 1")
        run = cur.fetchall()
        if not run:
            return None, list(BENCHMARK_MODEL_COLUMNS), []
        cur = con.execute("SELECT model_id AS name, kind, path, train_steps AS steps, final_loss FROM models "
                          "WHERE eval_id = ? ORDER BY kind DESC, model_id", [run[0][3]])
        return dict(zip(("run_id", "profile", "finished_at"), run[0][:3])), [d[0] for d in cur.description], cur.fetchall()


def latest_results(db: Path) -> tuple[list[str], list[tuple], tuple[str, str] | None]:
    """Table 1 of the latest completed run beside the paper's (columns, rows), and that run's
    (run_id, report path), None before any run completed."""
    names, rows = query(db, "SELECT * EXCLUDE (run_id) FROM latest_paper_table ORDER BY profile = 'paper', model")
    _, runs = query(db, "SELECT run_id, report_path FROM runs WHERE status = 'completed' ORDER BY finished_at DESC LIMIT 1")
    return names, rows, (runs[0] if runs else None)


def current_model_path(db: Path, dataset: str, kind_spellings: list[str]) -> str | None:
    """The folder of the registry's current model of `dataset`; else of the latest completed benchmark's
    model whose kind is one of `kind_spellings` (databases written before the kinds were unified spell
    Prompt Diffusion 'prompt_diffusion'); None when there is neither."""
    _, tables = query(db, "SELECT table_name FROM duckdb_tables() UNION ALL SELECT view_name FROM duckdb_views()")
    names = {t for (t,) in tables}
    if {"current_models", "registry"} <= names:
        _, rows = query(db, "SELECT r.path FROM current_models c JOIN registry r USING (dataset, model_id) "
                            "WHERE c.dataset = ?", [dataset])
        if rows:
            return rows[0][0]
    if {"models", "runs"} <= names:
        _, rows = query(db, "SELECT m.path FROM models m JOIN runs r USING (eval_id) WHERE list_contains(?, m.kind) "
                            "AND r.status = 'completed' ORDER BY r.finished_at DESC LIMIT 1", [kind_spellings])
        if rows:
            return rows[0][0]
    return None


def write_run(db: Path, row: RunRow) -> None:
    """A run's own row of `runs`, inserted when it starts and updated as it ends."""
    with connect(db) as con:
        ensure_schema(con)
        con.execute(row.insert_sql(replace=True), row.values())


EVALUATION_TABLES = (ModelRow, MetricRow, ReplicateMetricRow, SampleRow, ConfusionRow)


def replace_evaluation(db: Path, eval_id: str, rows: list[Row]) -> None:
    """Every row of one evaluation, in one transaction: rows an earlier, unfinished attempt left under
    `eval_id` are deleted first, and a key that repeats within `rows` is an error, never a silent
    replacement. The evaluate stage calls it once per eval_id, holding the stage's lock."""
    if stray := [r for r in rows if type(r) not in EVALUATION_TABLES or r.eval_id != eval_id]:
        raise ValueError(f"{len(stray)} row(s) are not evaluation rows of {eval_id}: {stray[:2]}")
    with connect(db) as con:
        ensure_schema(con)
        con.execute("BEGIN")
        try:
            for table in EVALUATION_TABLES:
                con.execute(f"DELETE FROM {table.TABLE} WHERE eval_id = ?", [eval_id])
                if batch := [r.values() for r in rows if type(r) is table]:
                    con.executemany(table.insert_sql(), batch)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
