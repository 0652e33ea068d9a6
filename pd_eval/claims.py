"""Who beats whom in Table 1's metrics (RMSE for image->map, FID for map->image; lower is better), by
one rule: a model beats a bar when its value is below it, and clearly when the upper end of its 95%
interval is below it too. The report's verdict and its claims table both come from here."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pd_data.tasks import TASKS
from pd_eval.baselines import BASELINES
from pd_eval.tables import with_interval

NAMES = {"prompt-diffusion": "Prompt Diffusion", "cn-ft": "CN(FT)"}
SHORT = {"prompt-diffusion": "PD", "cn-ft": "CN(FT)"}


def name(model_id: str, names: dict[str, str] = NAMES) -> str:
    """'cn-ft/nearest' -> 'CN(FT)/nearest'."""
    family, _, condition = model_id.partition("/")
    return names.get(family, family) + (f"/{condition}" if condition else "")


@dataclass(frozen=True)
class Outcome:
    """One model of one task against bars (baselines, or another model): by value, and by interval."""

    row: dict
    lost_to: tuple[str, ...]  # the bars its value is not below
    clear: bool  # below every bar, and so is its interval's upper end

    @property
    def beats(self) -> bool:
        return not self.lost_to


def outcome(row: dict, bars: dict[str, float]) -> Outcome:
    lost = tuple(b for b, v in bars.items() if row["value"] >= v)
    hi = row["ci_high"]
    return Outcome(row, lost, not lost and hi is not None and math.isfinite(hi) and hi < min(bars.values()))


@dataclass(frozen=True)
class TaskClaim:
    """Every model of a task against its trivial baselines (short name -> value)."""

    task: str
    metric: str
    baselines: dict[str, float]
    outcomes: dict[str, Outcome]  # model_id -> outcome

    @property
    def best(self) -> tuple[str, float]:
        return min(self.baselines.items(), key=lambda kv: kv[1])


def _by_key(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["model_id"], r["task"], r["metric"]): r for r in rows}


def task_claims(rows: list[dict]) -> list[TaskClaim]:
    """Per task that has baselines in `rows` (metric rows: model_id, task, metric, value, ci_low,
    ci_high): does each model beat every trivial baseline of the task in its Table-1 metric?"""
    by = _by_key(rows)
    out = []
    order = lambda t: (not TASKS[t].trained, TASKS[t].metric != "rmse", t)  # noqa: E731  (Table 1's: image->map first)
    for task in sorted({t for m, t, _ in by if m in BASELINES and t in TASKS}, key=order):
        metric = TASKS[task].metric
        base = {b.split("/")[1]: by[(b, task, metric)]["value"] for b in BASELINES if (b, task, metric) in by}
        models = sorted((m for m, t, k in by if t == task and k == metric and m not in BASELINES),
                        key=lambda m: (not m.startswith("prompt-diffusion"), m))
        if base and models:
            out.append(TaskClaim(task, metric, base, {m: outcome(by[(m, task, metric)], base) for m in models}))
    return out


def head_to_head(rows: list[dict], model: str = "prompt-diffusion", other: str = "cn-ft") -> dict[str, Outcome]:
    """task -> `model` against `other` on every trained task both were scored on, by the same rule."""
    by = _by_key(rows)
    return {t: outcome(by[(model, t, s.metric)], {other: by[(other, t, s.metric)]["value"]})
            for t, s in TASKS.items() if s.trained and (model, t, s.metric) in by and (other, t, s.metric) in by}


def _tally(claims: list[TaskClaim], model: str, metric: str) -> tuple[int, int, int]:
    """(tasks where `model` beats every baseline, tasks, of which clearly)."""
    mine = [c.outcomes[model] for c in claims if c.metric == metric and model in c.outcomes]
    return sum(o.beats for o in mine), len(mine), sum(o.clear for o in mine)


def verdict(rows: list[dict]) -> list[str]:
    """One to three lines: Prompt Diffusion against CN(FT), each model against the trivial baselines on
    the trained tasks, and Prompt Diffusion's zero-shot tasks against them."""
    lines = []
    if pair := head_to_head(rows):
        won = [t for t, o in pair.items() if o.beats]
        clear = sum(pair[t].clear for t in won)
        lines.append(f"Prompt Diffusion beats CN(FT) on {len(won)} of {len(pair)} trained tasks"
                     + (f" ({', '.join(won)}; its 95% interval clears CN(FT)'s value on {clear})." if won else "."))
    claims = task_claims(rows)
    trained = [c for c in claims if TASKS[c.task].trained]
    parts = []
    for model in ("prompt-diffusion", "cn-ft"):
        counts = {d: _tally(trained, model, m) for m, d in (("rmse", "image->map"), ("fid", "map->image"))}
        if said := [f"{w} of {n} {d}" for d, (w, n, _) in counts.items() if n]:
            parts.append(f"{NAMES[model]} on {' and '.join(said)} tasks (interval clear on {sum(c for *_, c in counts.values())})")
    if parts:
        lines.append("Beats every trivial baseline: " + "; ".join(parts) + ".")
    unseen = [c for c in claims if not TASKS[c.task].trained and "prompt-diffusion" in c.outcomes]
    if unseen:
        won = [c.task for c in unseen if c.outcomes["prompt-diffusion"].beats]
        lines.append(f"Unseen tasks, zero-shot: Prompt Diffusion beats every trivial baseline on {len(won)} of "
                     f"{len(unseen)}" + (f" ({', '.join(won)})." if won else "."))
    return [f"Verdict: {lines[0]}", *lines[1:]] if lines else ["Verdict: no model was scored against a baseline or "
                                                                "another model in this evaluation."]


def _said(model: str, o: Outcome, best: tuple[str, float], with_value: bool) -> str:
    who = name(model, SHORT) + (f" {o.row['value']:.3f}" if with_value else "")
    if o.clear:
        return f"{who} beats all (interval clear)"
    if o.beats:
        return f"{who} beats all (interval reaches {best[0]})"
    return f"{who} loses to {', '.join(o.lost_to)}"


def claims_table(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    """task | Prompt Diffusion (value [interval]) | best baseline | verdict of every model, one row per task."""
    out = []
    for c in task_claims(rows):
        pd = c.outcomes.get("prompt-diffusion")
        cell = with_interval(pd.row["value"], pd.row["ci_low"], pd.row["ci_high"]) if pd else ""
        said = "; ".join(_said(m, o, c.best, m != "prompt-diffusion") for m, o in c.outcomes.items())
        out.append((f"{c.task} ({c.metric.upper()})", cell, f"{c.best[0]} {c.best[1]:.3f}", said))
    return ["task", "Prompt Diffusion [95% interval]", "best baseline", "verdict"], out
