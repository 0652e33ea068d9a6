"""The one DuckDB schema of the state directory's `results/pd.duckdb`: every table is a typed row class
whose fields are its columns (DDL derived from the annotations), and `ensure_schema` makes them all,
with the views over them. The task lists in the paper tables come from the task registry.

Results: `RunRow`, `ModelRow`, `MetricRow`, `ReplicateMetricRow`, `SampleRow`, `ConfusionRow`, and the paper's own Table 1
(`paper_reference`). Live datasets: `SourceItemRow`, `DataRoundRow`. Model registry: `CandidateRow`,
`RegistryEventRow` (append-only).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from pd_data.tasks import TASKS, TRAINING_TASKS, UNSEEN_TASKS

_SQL = {str: "VARCHAR", int: "INTEGER", float: "DOUBLE", bool: "BOOLEAN", dt.datetime: "TIMESTAMP",
        list[str]: "VARCHAR[]", dict: "JSON"}


class Row:
    """A row of one table: `TABLE`, its primary key `KEY`, columns in field order."""

    TABLE: ClassVar[str]
    KEY: ClassVar[tuple[str, ...]]

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def column_types(cls) -> dict[str, str]:
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            optional = isinstance(t, types.UnionType)  # `float | None`: the column's type is float's
            out[f.name] = _SQL[next(a for a in typing.get_args(t) if a is not type(None)) if optional else t]
        return out

    @classmethod
    def ddl(cls) -> str:
        cols = ", ".join(f'"{name}" {sql}' for name, sql in cls.column_types().items())
        return f"CREATE TABLE IF NOT EXISTS {cls.TABLE} ({cols}, PRIMARY KEY ({', '.join(cls.KEY)}))"

    @classmethod
    def added_columns_sql(cls, existing: set[str]) -> list[str]:
        """The ALTERs that bring a table an older version made up to this row's columns: `CREATE TABLE IF
        NOT EXISTS` leaves an existing table as it was. A column added later must have a default (its
        old rows read NULL there)."""
        return [f'ALTER TABLE {cls.TABLE} ADD COLUMN IF NOT EXISTS "{name}" {sql}'
                for name, sql in cls.column_types().items() if name not in existing]

    @classmethod
    def insert_sql(cls, replace: bool = False) -> str:
        """The INSERT of one row; `replace` for a row that is its own to update (a run's)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        return f"{verb} INTO {cls.TABLE} ({', '.join(cls.columns())}) VALUES ({', '.join('?' * len(cls.columns()))})"

    def values(self) -> list[Any]:
        """The row's values as DuckDB takes them: a dict (a JSON column) as its JSON text."""
        return [json.dumps(v) if isinstance(v, dict) else v for v in (getattr(self, c) for c in self.columns())]


@dataclass(frozen=True)
class RunRow(Row):
    """One run of a flow that wrote a report; several runs may share one eval_id (the later ones cached)."""

    TABLE, KEY = "runs", ("run_id",)
    run_id: str
    profile: str
    eval_id: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    status: str  # running | completed | failed
    report_path: str | None
    config: dict
    # Resolved training precision ("train bf16 (train.mixed_precision=auto on cuda); base fp32 (...)") and
    # the machine of each stage as it was when the stage was computed (`pd_eval.provenance`): a stage
    # Cached from an earlier run may have run on another CPU. NULL in rows written before they were kept.
    precision: str | None = None
    machine: dict | None = None


@dataclass(frozen=True)
class ModelRow(Row):
    """A trained model folder an evaluation scored."""

    TABLE, KEY = "models", ("model_id", "eval_id")
    model_id: str
    eval_id: str
    kind: str  # prompt-diffusion | cn-ft
    tasks: list[str]
    path: str
    train_steps: int
    final_loss: float


@dataclass(frozen=True)
class MetricRow(Row):
    """One metric of one model on one task, with its bootstrap 95% interval. model_id: the Table 1 row
    ('prompt-diffusion', 'cn-ft'), a condition of the unseen tasks ('cn-ft/nearest', ...) or a baseline
    ('baseline/copy-example' on every task; 'baseline/copy-query', 'baseline/mean-map' on image->map)."""

    TABLE, KEY = "metrics", ("eval_id", "model_id", "task", "metric")
    eval_id: str
    model_id: str
    task: str
    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int
    feature_extractor: str
    protocol: str
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class ReplicateMetricRow(MetricRow):
    """A metric of one training replicate (`train.replicates`): the rows `metrics` pools (mean over
    replicates, interval over replicates and prompts: `pd_eval.replicates`). Models that were not
    replicated and the baselines have replicate 0 only."""

    TABLE, KEY = "replicate_metrics", ("eval_id", "model_id", "task", "metric", "replicate")
    replicate: int = 0


@dataclass(frozen=True)
class SampleRow(Row):
    TABLE, KEY = "samples", ("eval_id", "model_id", "prompt_id")
    eval_id: str
    model_id: str
    task: str
    prompt_id: str
    path: str


@dataclass(frozen=True)
class ConfusionRow(Row):
    """A cell of in-context task inference's confusion matrix: text removed, the pair shows shown_task,
    the output is nearest (RMSE) to the query's true map of predicted_task, or 'copied-example' when the
    example pair's target is at least as near; model_id 'baseline/copy-example' answers with that target."""

    TABLE, KEY = "task_inference", ("eval_id", "model_id", "shown_task", "predicted_task")
    eval_id: str
    model_id: str
    shown_task: str
    predicted_task: str
    count: int


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


@dataclass(frozen=True)
class CandidateRow(Row):
    """A retraining candidate and its decision."""

    TABLE, KEY = "registry", ("dataset", "model_id")
    dataset: str
    model_id: str
    data_round: int
    created_at: dt.datetime
    parent_id: str | None
    path: str
    eval_id: str
    train_steps: int
    from_scratch: bool
    final_loss: float
    decision: str
    rule: str
    reason: str


@dataclass(frozen=True)
class RegistryEventRow(Row):
    """Append-only log of promotions, rejections and rollbacks."""

    TABLE, KEY = "registry_events", ("dataset", "seq")
    dataset: str
    seq: int
    event_time: dt.datetime
    action: str
    model_id: str
    detail: str


TABLES: tuple[type[Row], ...] = (RunRow, ModelRow, MetricRow, ReplicateMetricRow, SampleRow, ConfusionRow, SourceItemRow, DataRoundRow,
                                 CandidateRow, RegistryEventRow)

# Table 1: FID of the map->image tasks, then RMSE of the image->map tasks, in the registry's order.
TABLE1 = tuple((TASKS[t].metric, t) for t in TRAINING_TASKS if TASKS[t].metric == "fid") + \
    tuple((TASKS[t].metric, t) for t in TRAINING_TASKS if TASKS[t].metric == "rmse")
PAPER_ROWS = {"CN(FT) [paper]": {"depth->image": 19.81, "hed->image": 13.07, "seg->image": 20.71,
                                 "image->depth": 0.20, "image->hed": 0.18, "image->seg": 0.36},
              "Prompt Diffusion [paper]": {"depth->image": 18.60, "hed->image": 13.35, "seg->image": 19.46,
                                           "image->depth": 0.21, "image->hed": 0.14, "image->seg": 0.31}}


def _paper_reference() -> list[str]:
    cols = ", ".join(f'"{m}_{t}" DOUBLE' for m, t in TABLE1)
    return [f"CREATE TABLE IF NOT EXISTS paper_reference (model VARCHAR, {cols})"]


def _views() -> list[str]:
    picked = ",\n    ".join(f"max(value) FILTER (WHERE metric = '{m}' AND task = '{t}') AS \"{m}_{t}\"" for m, t in TABLE1)
    return [f"""CREATE OR REPLACE VIEW paper_table AS
SELECT r.run_id, r.profile, m.model_id AS model, max(NULLIF(m.feature_extractor, '')) AS feature_extractor,
    {picked}
FROM runs r JOIN metrics m USING (eval_id)
WHERE (m.metric, m.task) IN ({", ".join(f"('{m}', '{t}')" for m, t in TABLE1)})
  AND (m.model_id NOT LIKE '%/%' OR m.model_id LIKE 'baseline/%')  -- a model's study conditions are not Table 1 rows
GROUP BY r.run_id, r.profile, m.model_id
UNION ALL BY NAME
SELECT NULL AS run_id, 'paper' AS profile, model, 'inception-v3' AS feature_extractor, * EXCLUDE (model)
FROM paper_reference""", f"""CREATE OR REPLACE VIEW generalization AS
SELECT r.run_id, r.profile, m.task, m.model_id AS condition, m.metric, m.value, m.ci_low, m.ci_high, m.n,
    m.feature_extractor
FROM runs r JOIN metrics m USING (eval_id)
WHERE m.task IN ({", ".join(f"'{t}'" for t in UNSEEN_TASKS)})""", """CREATE OR REPLACE VIEW latest_paper_table AS
SELECT * FROM paper_table
WHERE run_id IS NULL OR run_id = (SELECT run_id FROM runs WHERE status = 'completed'
                                  ORDER BY finished_at DESC LIMIT 1)""", """CREATE OR REPLACE VIEW current_models AS
SELECT dataset, arg_max(model_id, seq) AS model_id, arg_max(action, seq) AS via, max(event_time) AS since
FROM registry_events WHERE action IN ('promote', 'rollback') GROUP BY dataset""", """CREATE OR REPLACE VIEW controllability AS
SELECT r.run_id, r.profile, m.task, m.model_id AS model, m.metric, m.value, m.ci_low, m.ci_high, m.n,
    m.feature_extractor AS re_annotator
FROM runs r JOIN metrics m USING (eval_id)
WHERE m.metric LIKE 'ctrl_%' AND m.task NOT LIKE 'read:%'""", """CREATE OR REPLACE VIEW sensitivity AS
SELECT r.run_id, r.profile, m.task, split_part(m.model_id, '/', 2) AS pair, m.metric, m.value, m.ci_low, m.ci_high, m.n
FROM runs r JOIN metrics m USING (eval_id)
WHERE m.model_id IN ('prompt-diffusion/empty-pair', 'prompt-diffusion/other-pair')
  AND m.metric IN ('output_change', 'paired_diff_mse')""", """CREATE OR REPLACE VIEW replicate_spread AS
SELECT r.run_id, r.profile, m.model_id AS model, m.task, m.metric, count(*) AS replicates,
    avg(m.value) AS mean, stddev_samp(m.value) AS sd, min(m.value) AS min, max(m.value) AS max,
    list(m.value ORDER BY m.replicate) AS "values"
FROM runs r JOIN replicate_metrics m USING (eval_id)
GROUP BY ALL HAVING count(*) > 1"""]


def ensure_schema(con) -> None:
    """Every table and view (idempotent), and the paper's Table 1 rows once."""
    for statement in [t.ddl() for t in TABLES] + _paper_reference():
        con.execute(statement)
    have: dict[str, set[str]] = {}
    for table, column in con.execute("SELECT table_name, column_name FROM information_schema.columns "
                                     "WHERE table_schema = current_schema()").fetchall():
        have.setdefault(table, set()).add(column)
    for t in TABLES:
        for statement in t.added_columns_sql(have.get(t.TABLE, set())):
            con.execute(statement)
    if con.execute("SELECT count(*) FROM paper_reference").fetchone()[0] == 0:
        con.executemany(f"INSERT INTO paper_reference VALUES ({', '.join('?' * (len(TABLE1) + 1))})",
                        [[model, *(row[t] for _, t in TABLE1)] for model, row in PAPER_ROWS.items()])
    for statement in _views():
        con.execute(statement)
