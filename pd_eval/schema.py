"""The evaluation layer's tables in the state directory's DuckDB file, registered with `pd_core.rows`,
and the views users query.

Results: `RunRow`, `ModelRow`, `MetricRow`, `ReplicateMetricRow`, `SampleRow`, `ConfusionRow`, and the
paper's own Table 1 (`paper_reference`). Model registry: `CandidateRow`, `RegistryEventRow` (append-only).
The task lists in the paper tables come from the task registry.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pd_core.rows import Row, Schema, ensure_schema, register
from pd_data.tasks import TASKS, TRAINING_TASKS, UNSEEN_TASKS

__all__ = ["CandidateRow", "ConfusionRow", "MetricRow", "ModelRow", "PAPER_ROWS", "RegistryEventRow",
           "ReplicateMetricRow", "RunRow", "SampleRow", "TABLE1", "ensure_schema"]


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


# Table 1: FID of the map->image tasks, then RMSE of the image->map tasks, in the registry's order.
TABLE1 = tuple((TASKS[t].metric, t) for t in TRAINING_TASKS if TASKS[t].metric == "fid") + \
    tuple((TASKS[t].metric, t) for t in TRAINING_TASKS if TASKS[t].metric == "rmse")
PAPER_ROWS = {"CN(FT) [paper]": {"depth->image": 19.81, "hed->image": 13.07, "seg->image": 20.71,
                                 "image->depth": 0.20, "image->hed": 0.18, "image->seg": 0.36},
              "Prompt Diffusion [paper]": {"depth->image": 18.60, "hed->image": 13.35, "seg->image": 19.46,
                                           "image->depth": 0.21, "image->hed": 0.14, "image->seg": 0.31}}


def _paper_reference(con) -> None:
    """The paper's Table 1 rows, once."""
    cols = ", ".join(f'"{m}_{t}" DOUBLE' for m, t in TABLE1)
    con.execute(f"CREATE TABLE IF NOT EXISTS paper_reference (model VARCHAR, {cols})")
    if con.execute("SELECT count(*) FROM paper_reference").fetchone()[0] == 0:
        con.executemany(f"INSERT INTO paper_reference VALUES ({', '.join('?' * (len(TABLE1) + 1))})",
                        [[model, *(row[t] for _, t in TABLE1)] for model, row in PAPER_ROWS.items()])


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


register(Schema("evaluation", (RunRow, ModelRow, MetricRow, ReplicateMetricRow, SampleRow, ConfusionRow,
                               CandidateRow, RegistryEventRow), views=_views, setup=_paper_reference))
