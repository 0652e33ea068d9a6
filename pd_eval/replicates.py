"""Training replicates: each replicate's metrics, the pooled figure Table 1 shows, and the spread.

Replicate r of a model is the same model trained again on the same data and prompts from another
seed (`train.replicates`); it is evaluated on the same prompts with the same sampling seeds, so the
replicates differ by training alone. A metric of R replicates is pooled as

- value: the mean of the R replicate values;
- interval: a two-level (hierarchical) bootstrap. Each resample draws R replicates with replacement,
  then, for each drawn replicate, one value from that replicate's own sampling distribution over
  prompts, taken as normal with the spread of its 95% prompt-bootstrap interval (sd = width / 3.92);
  the mean of those R values is one resample, and the 2.5% and 97.5% points of 2,000 resamples are the
  interval. It covers both the training seed and the prompts. Resampling only R = 3 replicates
  understates the spread between them by a factor (R - 1) / R; the per-replicate rows are kept
  (`replicate_metrics`) so that any other estimator can be computed from them.

A metric that only replicate 0 has (a baseline, the re-annotator, a model that was not replicated)
is passed through unchanged.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from pd_eval.schema import MetricRow, ReplicateMetricRow

RESAMPLES = 2000
_Z95 = 1.959963984540054


def pooled_interval(values: list[float], lows: list[float | None], highs: list[float | None], seed: int = 0,
                    resamples: int = RESAMPLES) -> tuple[float, float]:
    """95% interval of the mean of replicate values, over replicates and each one's prompts (see above).
    A replicate without a finite interval counts with no prompt spread."""
    v = np.asarray(values, dtype=np.float64)
    sd = np.array([(h - lo) / (2 * _Z95) if lo is not None and h is not None and math.isfinite(lo) and math.isfinite(h)
                   else 0.0 for lo, h in zip(lows, highs)])
    r = np.random.default_rng([seed, len(v)])
    pick = r.integers(0, len(v), (resamples, len(v)))
    draws = v[pick] + sd[pick] * r.standard_normal((resamples, len(v)))
    means = draws.mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _key(m: MetricRow) -> tuple[str, str, str]:
    return m.model_id, m.task, m.metric


def replicate_rows(per_replicate: dict[int, list[MetricRow]]) -> list[ReplicateMetricRow]:
    """Every replicate's own metric rows, as stored in `replicate_metrics`."""
    return [ReplicateMetricRow(**{f: getattr(m, f) for f in MetricRow.columns()}, replicate=r)
            for r, rows in sorted(per_replicate.items()) for m in rows]


def pool(per_replicate: dict[int, list[MetricRow]], seed: int = 0) -> list[MetricRow]:
    """The metric rows Table 1 reads: a metric present in several replicates pooled (mean, two-level
    interval; n the prompts of each replicate times the replicates), one present in one only as it is."""
    if set(per_replicate) - {0} and 0 not in per_replicate:
        raise ValueError(f"replicates {sorted(per_replicate)} lack replicate 0, which holds the baselines")
    groups: dict[tuple[str, str, str], list[MetricRow]] = {}
    for r in sorted(per_replicate):
        for m in per_replicate[r]:
            groups.setdefault(_key(m), []).append(m)
    out = []
    for rows in groups.values():
        if len(rows) == 1:
            out.append(rows[0])
            continue
        lo, hi = pooled_interval([m.value for m in rows], [m.ci_low for m in rows], [m.ci_high for m in rows], seed)
        out.append(replace(rows[0], value=float(np.mean([m.value for m in rows])), ci_low=lo, ci_high=hi,
                           n=sum(m.n for m in rows)))
    return out


def as_replicate(rows: list[dict], replicate_rows_: list[dict], replicate: int) -> list[dict]:
    """The metric rows as replicate `replicate` alone gives them: its own rows (from `replicate_metrics`),
    and the pooled rows of every metric it has no row of (baselines, models not replicated)."""
    own = {(r["model_id"], r["task"], r["metric"]): r for r in replicate_rows_ if r["replicate"] == replicate}
    return list(own.values()) + [r for r in rows if (r["model_id"], r["task"], r["metric"]) not in own]


def replicates_of(replicate_rows_: list[dict]) -> list[int]:
    """The replicate indices present, when there are several (else [])."""
    found = sorted({r["replicate"] for r in replicate_rows_})
    return found if len(found) > 1 else []


def spread_table(replicate_rows_: list[dict], metrics: dict[str, str]) -> tuple[list[str], list[tuple]]:
    """model | task | metric | each replicate's value | mean | sd | max - min: the rows of replicated
    models in each task's verdict metric (`metrics`: task -> metric)."""
    reps = replicates_of(replicate_rows_)
    if not reps:
        return [], []
    by: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in replicate_rows_:
        if metrics.get(r["task"]) == r["metric"]:
            by.setdefault((r["model_id"], r["task"], r["metric"]), {})[r["replicate"]] = r["value"]
    rows = []
    for (model, task, metric), vals in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(vals) < 2:
            continue
        v = np.array(list(vals.values()))
        rows.append((model, task, metric, *[vals.get(i) for i in reps], float(v.mean()), float(v.std(ddof=1)),
                     float(v.max() - v.min())))
    return ["model", "task", "metric", *[f"replicate {i}" for i in reps], "mean", "sd", "max - min"], rows
