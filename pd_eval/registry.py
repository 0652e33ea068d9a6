"""Model registry in DuckDB: every retraining candidate, its decision and the rule that made it.

`registry` has one row per candidate; `registry_events` is an append-only log of promotions,
rejections and rollbacks, and the current model of a dataset is the target of its latest
promotion or rollback (view `current_models`). Nothing is replaced silently: a candidate becomes
current only by the promotion rule or by an explicit rollback, and both are logged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pd_core.db import connect
from pd_eval.schema import CandidateRow, RegistryEventRow, ensure_schema

RULE = ("promote when no Table-1 metric (FID, RMSE: lower is better) is worse than the current model's "
        "beyond its 95% interval, and the mean relative change over those metrics is an improvement")
PRIMARY_METRICS = ("fid", "rmse")


@dataclass(frozen=True)
class Score:
    value: float
    ci_low: float
    ci_high: float


Scores = dict[tuple[str, str], Score]  # (task, metric) -> score


def decide(candidate: Scores, current: Scores | None) -> tuple[bool, str]:
    """(promote?, why) by `RULE`; the first model of a dataset is promoted."""
    if current is None:
        return True, "first model of this dataset"
    keys = sorted(k for k in candidate.keys() & current.keys() if k[1] in PRIMARY_METRICS)
    if not keys:
        raise ValueError(f"no common Table-1 metrics to compare: candidate {sorted(candidate)}, current {sorted(current)}")
    worse, changes = [], []
    for k in keys:
        cand, cur = candidate[k], current[k]
        bound = cur.ci_high if math.isfinite(cur.ci_high) else cur.value
        if cand.value > bound:
            worse.append(f"{k[1]} {k[0]} {cand.value:.4g} > {bound:.4g}")
        changes.append((cand.value - cur.value) / max(abs(cur.value), 1e-12))
    mean_change = sum(changes) / len(changes)
    if worse:
        return False, f"worse beyond the interval on {len(worse)} of {len(keys)}: " + "; ".join(worse)
    if mean_change >= 0:
        return False, f"no metric worse beyond its interval, but the mean relative change is {mean_change:+.2%} (not an improvement)"
    return True, f"no metric worse beyond its interval; mean relative change {mean_change:+.2%}"


def scores(db: Path, eval_id: str, model_id: str = "prompt-diffusion") -> Scores:
    with connect(db, read_only=True) as con:
        rows = con.execute("SELECT task, metric, value, ci_low, ci_high FROM metrics WHERE eval_id = ? AND model_id = ?",
                           [eval_id, model_id]).fetchall()
    return {(t, m): Score(v, lo if lo is not None else math.nan, hi if hi is not None else math.nan)
            for t, m, v, lo, hi in rows}


def current(db: Path, dataset: str) -> dict | None:
    """The registry row of the dataset's current model, or None before the first promotion."""
    if not db.exists():
        return None
    with connect(db) as con:
        ensure_schema(con)
        cur = con.execute("SELECT r.* FROM current_models c JOIN registry r USING (dataset, model_id) WHERE dataset = ?",
                          [dataset])
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row)) if row else None


def _event(con, dataset: str, action: str, model_id: str, detail: str) -> None:
    seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM registry_events WHERE dataset = ?", [dataset]).fetchone()[0]
    event = RegistryEventRow(dataset, seq, datetime.now(timezone.utc), action, model_id, detail)
    con.execute(event.insert_sql(), event.values())


def record(db: Path, row: dict, promote: bool, reason: str) -> None:
    """The candidate's row and its decision event, in one transaction."""
    cand = CandidateRow(**row, decision="promoted" if promote else "rejected", rule=RULE, reason=reason)
    with connect(db) as con:
        ensure_schema(con)
        con.execute("BEGIN")
        con.execute(cand.insert_sql(), cand.values())
        _event(con, cand.dataset, "promote" if promote else "reject", cand.model_id, reason)
        con.execute("COMMIT")


def rollback(db: Path, dataset: str, to: str | None = None) -> str:
    """Make `to` (default: the model that was current before the present one) current again; returns its id."""
    with connect(db) as con:
        ensure_schema(con)
        history = [r[0] for r in con.execute(
            "SELECT model_id FROM registry_events WHERE dataset = ? AND action IN ('promote', 'rollback') ORDER BY seq",
            [dataset]).fetchall()]
        known = {r[0] for r in con.execute("SELECT model_id FROM registry WHERE dataset = ?", [dataset]).fetchall()}
        if not history:
            raise ValueError(f"dataset {dataset!r} has no promoted model to roll back from; see `pd models`")
        if to is None:
            earlier = [m for m in history if m != history[-1]]
            if not earlier:
                raise ValueError(f"dataset {dataset!r} has had only one current model ({history[-1]}); nothing to roll back to")
            to = earlier[-1]
        if to not in known:
            raise ValueError(f"no model {to!r} in dataset {dataset!r}; known: {sorted(known)} (see `pd models`)")
        con.execute("BEGIN")
        _event(con, dataset, "rollback", to, f"rolled back from {history[-1]}")
        con.execute("COMMIT")
    return to


LISTING_COLUMNS = ("dataset", "model_id", "data_round", "created_at", "parent_id", "train_steps", "decision",
                   "current", "reason")


def listing(db: Path, dataset: str | None = None) -> tuple[list[str], list[tuple]]:
    """Every candidate with its decision, newest first, the current one marked. It only reads: before the
    first candidate is recorded (no database, or one without the registry) it is empty and creates nothing."""
    if not db.exists():
        return list(LISTING_COLUMNS), []
    with connect(db, read_only=True) as con:
        if not con.execute("SELECT count(*) FROM duckdb_views() WHERE database_name = current_database() "
                           "AND schema_name = 'main' AND view_name = 'current_models'").fetchone()[0]:
            return list(LISTING_COLUMNS), []
        cur = con.execute("""
            SELECT r.dataset, r.model_id, r.data_round, r.created_at, r.parent_id, r.train_steps,
                   r.decision, (c.model_id IS NOT NULL) AS current, r.reason
            FROM registry r LEFT JOIN current_models c USING (dataset, model_id)
            WHERE ? IS NULL OR r.dataset = ? ORDER BY r.dataset, r.created_at DESC""", [dataset, dataset])
        return [d[0] for d in cur.description], cur.fetchall()


def pending_round(db: Path, dataset: str) -> dict | None:
    """The latest committed data round of `dataset` if no candidate was recorded for it (its run
    crashed): its `data_rounds` row, else None."""
    with connect(db) as con:
        ensure_schema(con)
        row = con.execute("""SELECT d.round FROM data_rounds d LEFT JOIN registry r
                             ON r.dataset = d.dataset AND r.data_round = d.round
                             WHERE d.dataset = ? AND r.model_id IS NULL ORDER BY d.round DESC LIMIT 1""",
                          [dataset]).fetchone()
        last = con.execute("SELECT max(round) FROM data_rounds WHERE dataset = ?", [dataset]).fetchone()[0]
        if not row or row[0] != last:
            return None
        cur = con.execute("SELECT * EXCLUDE (created_at, config_hash) FROM data_rounds WHERE dataset = ? AND round = ?",
                          [dataset, last])
        return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def retrain_eval_id(dataset: str, model_id: str, cfg, prompts: Path) -> tuple[str, str]:
    """(eval_id, settings key) of one registry model scored on a frozen benchmark's prompts."""
    import hashlib

    from pd_core.state import fingerprint

    key = fingerprint("retrain-eval", cfg.identity(), hashlib.sha256(prompts.read_bytes()).hexdigest())
    return f"retrain:{dataset}:{model_id}:{key}", key


def evaluated(db: Path, eval_id: str) -> bool:
    with connect(db, read_only=True) as con:
        return con.execute("SELECT count(*) FROM metrics WHERE eval_id = ?", [eval_id]).fetchone()[0] > 0


def round_report(dataset: str, model_id: str, data: dict, cand: dict, parent: str | None, current_id: str | None,
                 cand_scores: Scores, cur_scores: Scores | None, promoted: bool, reason: str, now_current: str) -> str:
    """The Markdown report of one retraining round: data in, candidate, metrics side by side, decision."""
    lines = [f"# Retraining of `{dataset}`: candidate `{model_id}`", "",
             f"**Decision: {'PROMOTED' if promoted else 'REJECTED'}.** {reason}. Current model now: `{now_current}`.", "",
             f"Rule: {RULE}.", "", "## Data",
             f"Round {data['round']}{' (resumed)' if data.get('resumed') else ''}: {data['listed']} items listed; "
             f"{data['added']} added, {data['changed']} changed, {data['deleted']} deleted, {data['rejected']} rejected, "
             f"{data['unchanged']} unchanged. Annotated this round: {data['annotated']} (only new or changed items).", "",
             "## Candidate",
             f"{'From scratch' if parent is None else f'Continued from `{parent}`'}; "
             f"{cand['steps']} steps, final loss {cand['final_loss']:.4f}.", "", "## Metrics (same benchmark, same prompts and seeds)",
             f"| task | metric | current{f' ({current_id})' if current_id else ''} | candidate | change |", "|---|---|---|---|---|"]
    for (t, m), s in sorted(cand_scores.items()):
        c = (cur_scores or {}).get((t, m))
        cur_txt = f"{c.value:.4f} [{c.ci_low:.4f}, {c.ci_high:.4f}]" if c else "-"
        change = f"{(s.value - c.value) / max(abs(c.value), 1e-12):+.1%}" if c else "-"
        lines.append(f"| {t} | {m} | {cur_txt} | {s.value:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}] | {change} |")
    return "\n".join(lines) + "\n"
