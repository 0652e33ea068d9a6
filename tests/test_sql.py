"""`pd sql` is read-only: only reading statements run, on a read-only connection confined to the state
directory with its settings locked; `pd models` reads and creates nothing. Real DuckDB files, real Parquet."""
import hashlib
from pathlib import Path

import duckdb
import pytest

from flows.cli import main as pd_main
from pd_core.db import connect_confined
from pd_data.shards import IMAGES_SCHEMA, write_shard
from pd_core.state import StateDir
from pd_eval.registry import LISTING_COLUMNS, listing
from pd_eval.store import ReadOnlyError, init_db, query, register_data_views

N_IMAGES = 3


def _image(i: int) -> dict:
    return {"image_id": f"g-0-{i}", "group_id": "g", "layout_id": "g-0", "split": "test", "caption": "c",
            "image": b"", "width": 8, "height": 8, "source": "procedural", "provenance": "{}"}


@pytest.fixture
def state(tmp_path, monkeypatch) -> StateDir:
    """A state directory with one ingest shard and its views; the working directory is a decoy holding a
    `data/` folder of its own, which no query may read."""
    state = StateDir(tmp_path / "state")
    write_shard(state.stage_dir("ingest", "k") / "images-00000.parquet", [_image(i) for i in range(N_IMAGES)],
                IMAGES_SCHEMA)
    register_data_views(state.db, state.data)
    decoy = tmp_path / "cwd"
    write_shard(decoy / "data" / "ingest" / "k" / "images-00000.parquet", [_image(9)], IMAGES_SCHEMA)
    monkeypatch.chdir(decoy)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where INSTALL would put an extension
    (tmp_path / "home").mkdir()
    return state


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root`, with a hash of each file's bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _n_images(state: StateDir) -> int:
    return query(state.db, "SELECT count(*) FROM images")[1][0][0]


def test_copy_to_is_refused_and_no_shard_appears(state):
    shard = state.stage_dir("ingest", "k") / "images-00001.parquet"  # inside the state directory: readable
    before = _snapshot(state.root)
    for sql in (f"COPY (SELECT * FROM images) TO '{shard}' (FORMAT parquet)",
                f"SELECT 1; COPY (SELECT * FROM images) TO '{shard}' (FORMAT parquet)",
                f"EXPLAIN ANALYZE COPY (SELECT * FROM images) TO '{shard}' (FORMAT parquet)"):
        with pytest.raises(ReadOnlyError, match=r"refused (EXPLAIN of )?COPY statement .*the SQL shell is read-only"):
            query(state.db, sql)
    assert not shard.exists() and _snapshot(state.root) == before
    assert _n_images(state) == N_IMAGES


@pytest.mark.parametrize("sql", ["EXPORT DATABASE '{target}'", "EXPORT DATABASE '{target}' (FORMAT parquet)",
                                 "IMPORT DATABASE '{target}'"])
def test_export_and_import_database_are_refused(state, sql):
    target = state.root / "export"
    before = _snapshot(state.root)
    with pytest.raises(ReadOnlyError, match=r"refused (EXPORT|PRAGMA) statement .*read-only"):
        query(state.db, sql.format(target=target))
    assert not target.exists() and _snapshot(state.root) == before


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_attach_read_write_of_another_database_is_refused(state, tmp_path, where):
    other = (state.root if where == "inside" else tmp_path) / "other.duckdb"
    with duckdb.connect(str(other)) as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS a")
    before = hashlib.sha256(other.read_bytes()).hexdigest()
    with pytest.raises(ReadOnlyError, match="refused ATTACH statement"):
        query(state.db, f"ATTACH '{other}' AS o (READ_WRITE); INSERT INTO o.t VALUES (2); CREATE TABLE o.u AS SELECT 3")
    assert hashlib.sha256(other.read_bytes()).hexdigest() == before
    with duckdb.connect(str(other), read_only=True) as con:
        assert con.execute("SELECT * FROM t").fetchall() == [(1,)]
        assert con.execute("SELECT count(*) FROM duckdb_tables()").fetchone()[0] == 1


@pytest.mark.parametrize("sql", ["INSTALL httpfs", "FORCE INSTALL httpfs", "LOAD httpfs"])
def test_extensions_are_neither_installed_nor_loaded(state, tmp_path, sql):
    before = _snapshot(state.root)
    with pytest.raises(ReadOnlyError, match=f"refused LOAD statement `{sql}`"):  # before any network
        query(state.db, sql)
    assert _snapshot(state.root) == before and _snapshot(tmp_path / "home") == {}


def test_a_remote_file_is_refused_without_autoloading_httpfs(state, tmp_path):
    with pytest.raises(duckdb.PermissionException, match="reads files under the state directory"):
        query(state.db, "SELECT * FROM read_parquet('https://example.com/images-00000.parquet')")
    assert _snapshot(tmp_path / "home") == {}  # no extension folder: nothing was installed


@pytest.mark.parametrize("path", ["/etc/passwd", "{tmp}/secret.csv", "{root}/../secret.csv",
                                  "data/ingest/k/images-00000.parquet"])  # the last: the decoy working directory's
def test_files_outside_the_state_directory_are_refused(state, tmp_path, path):
    (tmp_path / "secret.csv").write_text("a\n1\n")
    path = path.format(tmp=tmp_path, root=state.root)
    reader = "read_parquet" if path.endswith(".parquet") else "read_csv"
    with pytest.raises(duckdb.PermissionException, match=f"state directory {state.root} only"):
        query(state.db, f"SELECT * FROM {reader}('{path}')")


@pytest.mark.parametrize("sql", [
    "INSERT INTO runs SELECT * FROM runs", "CREATE TABLE x (a INT)", "CREATE TEMP TABLE x AS SELECT 1",
    "CREATE OR REPLACE VIEW images AS SELECT 1", "DROP VIEW images", "DELETE FROM runs", "UPDATE runs SET status = 'x'",
    "SELECT 1; DROP VIEW images", "CHECKPOINT", "VACUUM", "DETACH pd", "USE memory", "BEGIN"])
def test_writes_are_refused(state, sql):
    before = _snapshot(state.root)
    with pytest.raises(ReadOnlyError, match="refused [A-Z_]+ statement .*the SQL shell is read-only"):
        query(state.db, sql)
    assert _snapshot(state.root) == before and _n_images(state) == N_IMAGES


@pytest.mark.parametrize("sql", ["SET enable_external_access = true", "RESET allowed_directories",
                                 "PRAGMA enable_external_access = true", "SET autoinstall_known_extensions = true",
                                 "SET lock_configuration = false"])
def test_settings_cannot_be_changed(state, sql):
    with pytest.raises(ReadOnlyError, match="refused SET statement"):
        query(state.db, sql)
    with connect_confined(state.db) as con:  # and were it let through, the locked configuration refuses it
        with pytest.raises(duckdb.InvalidInputException, match="configuration has been locked"):
            con.execute(sql)
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(duckdb.InvalidInputException, match="read-only"):  # opened read-only, too
            con.execute("CREATE TABLE x (a INT)")


@pytest.mark.parametrize("sql, check", [
    ("SELECT count(*) FROM images", lambda n, r: r == [(N_IMAGES,)]),
    ("FROM splits", lambda n, r: r == [("k", "test", N_IMAGES, 1)]),
    ("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'runs'", lambda n, r: r == [(1,)]),
    ("SELECT count(*) FROM glob('data/ingest/*/images-*.parquet')", lambda n, r: r == [(1,)]),
    ("DESCRIBE images", lambda n, r: "image_id" in [c[0] for c in r]),
    ("SHOW TABLES", lambda n, r: ("images",) in r and ("runs",) in r),
    ("SUMMARIZE images", lambda n, r: "image_id" in [c[0] for c in r]),
    ("EXPLAIN SELECT * FROM images", lambda n, r: "explain_key" in n),
    ("EXPLAIN ANALYZE SELECT * FROM images", lambda n, r: "explain_key" in n),
    ("PRAGMA table_info('runs')", lambda n, r: "run_id" in [c[1] for c in r]),
    ("SELECT 1; SELECT image_id FROM images ORDER BY 1 LIMIT 1", lambda n, r: r == [("g-0-0",)])])
def test_reading_statements_run_over_the_data_views_and_system_tables(state, sql, check):
    before = _snapshot(state.root)
    names, rows = query(state.db, sql)
    assert check(names, rows), (names, rows)
    assert _snapshot(state.root) == before


def test_internal_queries_pass_parameters_to_the_last_statement(state):
    assert query(state.db, "SELECT 1; SELECT count(*) FROM images WHERE split = ?", ["test"])[1] == [(N_IMAGES,)]
    assert query(state.db, "SELECT count(*) FROM runs WHERE run_id = $id", {"id": "none"})[1] == [(0,)]


def test_a_deleted_working_directory_is_a_clear_error(state, tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError, match="working directory no longer exists"):
        query(state.db, "SELECT count(*) FROM images")


def test_a_missing_database_says_what_creates_it_and_creates_nothing(tmp_path, state_dir, capsys):
    with pytest.raises(FileNotFoundError, match=r"no results exist yet.*make benchmark"):
        query(StateDir(state_dir).db, "SELECT 1")
    assert pd_main(["sql", "SELECT 1"]) == 2
    assert "no results exist yet" in capsys.readouterr().err
    assert not state_dir.exists()


def test_models_on_a_fresh_state_directory_lists_none_and_creates_nothing(state_dir, capsys):
    assert listing(StateDir(state_dir).db) == (list(LISTING_COLUMNS), [])
    assert pd_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "benchmark models: none yet" in out and "model registry: no models yet" in out
    assert not state_dir.exists()


def test_models_on_a_database_without_the_registry_reads_only(tmp_path):
    db = StateDir(tmp_path / "old").db
    db.parent.mkdir(parents=True)
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE notes (note VARCHAR)")  # a DuckDB file the registry never wrote to
    before = _snapshot(db.parent)
    assert listing(db) == (list(LISTING_COLUMNS), [])
    assert _snapshot(db.parent) == before
    init_db(db)  # the registry's tables and views: the same columns as the empty listing's
    assert listing(db) == (list(LISTING_COLUMNS), [])
