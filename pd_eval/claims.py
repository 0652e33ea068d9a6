"""Who beats whom, by one rule: a model beats a bar when its value is better than it, and clearly when
the far end of its 95% interval is better too. The metric of a task is its verdict metric: RMSE for
image->map; for map->image the controllability headline when the outputs were read back
(`pd_eval.reannotate`: FID cannot see whether an output follows its query), else FID. The report's
verdict and its claims table both come from here.

With training replicates, a claim is made only when it holds in every replicate: each replicate's
own rows (`replicate_metrics`, the baselines and unreplicated models pooled) are judged by the same
rule, and a model whose "beats" or "loses" differs in some replicate gets no claim; the report says
which replicate disagrees."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pd_data.tasks import TASKS
from pd_eval.baselines import BASELINES
from pd_eval.control import METRICS
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
    dissent: tuple[tuple[int, str], ...] = ()  # (replicate, what it says) of each replicate that says otherwise

    @property
    def beats(self) -> bool:
        return not self.lost_to and not self.dissent

    @property
    def loses(self) -> bool:
        return bool(self.lost_to) and not self.dissent

    def said(self) -> str:
        """What this outcome says on its own: "beats all" or "loses to a, b"."""
        return f"loses to {', '.join(self.lost_to)}" if self.lost_to else "beats all"


def agreed(pooled: Outcome, per_replicate: dict[int, Outcome]) -> Outcome:
    """`pooled` with the replicates whose own outcome says otherwise (beats where it loses, or the reverse)."""
    dissent = tuple((r, o.said()) for r, o in sorted(per_replicate.items()) if bool(o.lost_to) != bool(pooled.lost_to))
    return replace(pooled, dissent=dissent, clear=pooled.clear and not dissent)


def outcome(row: dict, bars: dict[str, float], higher: bool = False) -> Outcome:
    """`row` against `bars`; `higher`: its metric is better when higher (SSIM, mIoU, F1)."""
    lost = tuple(b for b, v in bars.items() if (row["value"] <= v if higher else row["value"] >= v))
    far = row["ci_low"] if higher else row["ci_high"]
    clear = far is not None and math.isfinite(far) and (far > max(bars.values()) if higher else far < min(bars.values()))
    return Outcome(row, lost, not lost and clear)


# map->image verdict metrics, the first present wins: the controllability headlines (`pd_eval.control`).
CONTROL_HEADLINES = ("ctrl_dataset_miou", "ctrl_msssim", "ctrl_ssim", "ctrl_rmse", "ctrl_f1", "ctrl_angle")
HIGHER = {name for name, m in METRICS.items() if m.higher_is_better}


def verdict_metric(task: str, keys) -> tuple[str, bool]:
    """(metric, higher is better) that decides `task`'s claims, given the (model, task, metric) keys present."""
    if TASKS[task].target == "image":
        present = {k for m, t, k in keys if t == task and m == "prompt-diffusion"}
        for k in CONTROL_HEADLINES:
            if k in present:
                return k, k in HIGHER
    return TASKS[task].metric, False


def _is_model(model_id: str) -> bool:
    """A trained model or one of its conditions; not a baseline, the ceiling or the re-annotator."""
    return not model_id.startswith(("baseline/", "re-annotator"))


@dataclass(frozen=True)
class TaskClaim:
    """Every model of a task against its trivial baselines (short name -> value)."""

    task: str
    metric: str
    baselines: dict[str, float]
    outcomes: dict[str, Outcome]  # model_id -> outcome
    higher: bool = False  # the metric is better when higher

    @property
    def best(self) -> tuple[str, float]:
        return (max if self.higher else min)(self.baselines.items(), key=lambda kv: kv[1])


def _by_key(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["model_id"], r["task"], r["metric"]): r for r in rows}


def _per_replicate(rows: list[dict], replicate_rows: list[dict] | None) -> dict[int, list[dict]]:
    from pd_eval.replicates import as_replicate, replicates_of

    reps = replicates_of(replicate_rows or [])
    return {r: as_replicate(rows, replicate_rows, r) for r in reps}


def task_claims(rows: list[dict], replicate_rows: list[dict] | None = None) -> list[TaskClaim]:
    """Per task that has baselines in `rows` (metric rows: model_id, task, metric, value, ci_low,
    ci_high): does each model beat every trivial baseline of the task in its Table-1 metric? With
    several replicates in `replicate_rows`, only where every replicate agrees (`agreed`)."""
    out = _task_claims(rows)
    per = {r: {(c.task, m): o for c in _task_claims(rs) for m, o in c.outcomes.items()}
           for r, rs in _per_replicate(rows, replicate_rows).items()}
    if not per:
        return out
    return [replace(c, outcomes={m: agreed(o, {r: p[(c.task, m)] for r, p in per.items() if (c.task, m) in p})
                                 for m, o in c.outcomes.items()}) for c in out]


def _task_claims(rows: list[dict]) -> list[TaskClaim]:
    by = _by_key(rows)
    out = []
    order = lambda t: (not TASKS[t].trained, TASKS[t].metric != "rmse", t)  # noqa: E731  (Table 1's: image->map first)
    for task in sorted({t for m, t, _ in by if m in BASELINES and t in TASKS}, key=order):
        metric, higher = verdict_metric(task, by)
        base = {b.split("/")[1]: by[(b, task, metric)]["value"] for b in BASELINES if (b, task, metric) in by}
        models = sorted((m for m, t, k in by if t == task and k == metric and _is_model(m)),
                        key=lambda m: (not m.startswith("prompt-diffusion"), m))
        if base and models:
            out.append(TaskClaim(task, metric, base, {m: outcome(by[(m, task, metric)], base, higher) for m in models}, higher))
    return out


def head_to_head(rows: list[dict], model: str = "prompt-diffusion", other: str = "cn-ft",
                 replicate_rows: list[dict] | None = None) -> dict[str, Outcome]:
    """task -> `model` against `other` on every trained task both were scored on, by the same rule (and
    with several replicates, only where every replicate agrees)."""
    out = _head_to_head(rows, model, other)
    per = {r: _head_to_head(rs, model, other) for r, rs in _per_replicate(rows, replicate_rows).items()}
    return {t: agreed(o, {r: p[t] for r, p in per.items() if t in p}) for t, o in out.items()} if per else out


def _head_to_head(rows: list[dict], model: str, other: str) -> dict[str, Outcome]:
    by, out = _by_key(rows), {}
    for t, s in TASKS.items():
        metric, higher = verdict_metric(t, by)
        if s.trained and (model, t, metric) in by and (other, t, metric) in by:
            out[t] = outcome(by[(model, t, metric)], {other: by[(other, t, metric)]["value"]}, higher)
    return out


def _tally(claims: list[TaskClaim], model: str, forward: bool) -> tuple[int, int, int]:
    """(tasks of a direction where `model` beats every baseline, tasks, of which clearly)."""
    mine = [c.outcomes[model] for c in claims if (TASKS[c.task].source == "image") == forward and model in c.outcomes]
    return sum(o.beats for o in mine), len(mine), sum(o.clear for o in mine)


def _split(outcomes: dict[str, Outcome]) -> str:
    """"; replicates disagree on a, b (no claim)" for the outcomes that replicates split, else ""."""
    split = [k for k, o in outcomes.items() if o.dissent]
    return f"; replicates disagree on {', '.join(split)} (no claim)" if split else ""


def verdict(rows: list[dict], replicate_rows: list[dict] | None = None) -> list[str]:
    """One to three lines: Prompt Diffusion against CN(FT), each model against the trivial baselines on
    the trained tasks, and Prompt Diffusion's zero-shot tasks against them; with several replicates, a
    claim only where all of them agree."""
    from pd_eval.replicates import replicates_of

    lines = []
    reps = replicates_of(replicate_rows or [])
    if pair := head_to_head(rows, replicate_rows=replicate_rows):
        won = [t for t, o in pair.items() if o.beats]
        clear = sum(pair[t].clear for t in won)
        lines.append(f"Prompt Diffusion beats CN(FT) on {len(won)} of {len(pair)} trained tasks"
                     + (f" ({', '.join(won)}; its 95% interval clears CN(FT)'s value on {clear})" if won else "")
                     + (f" in all {len(reps)} replicates" if reps else "") + _split(pair) + ".")
    claims = task_claims(rows, replicate_rows)
    trained = [c for c in claims if TASKS[c.task].trained]
    parts = []
    for model in ("prompt-diffusion", "cn-ft"):
        counts = {d: _tally(trained, model, f) for f, d in ((True, "image->map"), (False, "map->image"))}
        if said := [f"{w} of {n} {d}" for d, (w, n, _) in counts.items() if n]:
            parts.append(f"{NAMES[model]} on {' and '.join(said)} tasks (interval clear on {sum(c for *_, c in counts.values())})")
    if parts:
        lines.append("Beats every trivial baseline: " + "; ".join(parts) + ".")
    unseen = [c for c in claims if not TASKS[c.task].trained and "prompt-diffusion" in c.outcomes]
    if unseen:
        won = [c.task for c in unseen if c.outcomes["prompt-diffusion"].beats]
        lines.append(f"Unseen tasks, zero-shot: Prompt Diffusion beats every trivial baseline on {len(won)} of "
                     f"{len(unseen)}" + (f" ({', '.join(won)})" if won else "")
                     + _split({c.task: c.outcomes["prompt-diffusion"] for c in unseen}) + ".")
    return [f"Verdict: {lines[0]}", *lines[1:]] if lines else ["Verdict: no model was scored against a baseline or "
                                                                "another model in this evaluation."]


def _said(model: str, o: Outcome, best: tuple[str, float], with_value: bool) -> str:
    who = name(model, SHORT) + (f" {o.row['value']:.3f}" if with_value else "")
    if o.dissent:
        return (f"{who}: no claim, replicates disagree (pooled: {o.said()}; "
                + "; ".join(f"replicate {r}: {said}" for r, said in o.dissent) + ")")
    if o.clear:
        return f"{who} beats all (interval clear)"
    if o.beats:
        return f"{who} beats all (interval reaches {best[0]})"
    return f"{who} loses to {', '.join(o.lost_to)}"


def claims_table(rows: list[dict], replicate_rows: list[dict] | None = None) -> tuple[list[str], list[tuple]]:
    """task | Prompt Diffusion (value [interval]) | best baseline | verdict of every model, one row per task."""
    out = []
    for c in task_claims(rows, replicate_rows):
        pd = c.outcomes.get("prompt-diffusion")
        cell = with_interval(pd.row["value"], pd.row["ci_low"], pd.row["ci_high"]) if pd else ""
        said = "; ".join(_said(m, o, c.best, m != "prompt-diffusion") for m, o in c.outcomes.items())
        label = (f"control {c.metric[5:].replace('_', ' ')}, {'higher' if c.higher else 'lower'} is better"
                 if c.metric.startswith("ctrl_") else c.metric.upper())
        out.append((f"{c.task} ({label})", cell, f"{c.best[0]} {c.best[1]:.3f}", said))
    return ["task", "Prompt Diffusion [95% interval]", "best baseline", "verdict"], out
