"""The report's tables as a reader sees them: Table 1 split by direction so each fits a narrow
column, and an estimate that lies outside its own 95% interval marked, with the reason."""
from __future__ import annotations

import math

DAGGER = "\u2020"
OUTSIDE_NOTE = (f"{DAGGER} The estimate lies outside its own 95% interval. FID and KID are distances between sets, "
                "and their percentile bootstrap resamples images with repetition: a resampled set repeats some "
                "images and lacks others, which makes it less varied and raises its distance, so on small sets "
                "the whole interval can lie above the estimate. Read the estimate (the sets as they are); the "
                "interval's width still shows how much the choice of images moves it.")
DIRECTIONS = {"rmse": ("image->map", "RMSE on a 0..1 scale, lower is better"),
              "fid": ("map->image", "FID, lower is better")}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def outside(value: float, lo: float | None, hi: float | None) -> bool:
    """Whether `value` lies outside [lo, hi]; an undefined interval (None, NaN) contains everything."""
    return _finite(lo) and _finite(hi) and not lo <= value <= hi


def with_interval(value: float, lo: float | None, hi: float | None) -> str:
    """'0.168 [0.173, 0.386]†' (the mark where the interval misses the estimate); '0.168' without one."""
    if not (_finite(lo) and _finite(hi)):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" + (DAGGER if outside(value, lo, hi) else "")


def mark_outside(names: list[str], rows: list[tuple]) -> tuple[list[tuple], bool]:
    """`rows` of a table with value, ci_low and ci_high columns, each value its interval misses as
    '0.1684†'; and whether any cell carries the mark (cells `with_interval` made included)."""
    if not {"value", "ci_low", "ci_high"} <= set(names):
        return rows, any(DAGGER in c for r in rows for c in r if isinstance(c, str))
    v, lo, hi = (names.index(c) for c in ("value", "ci_low", "ci_high"))
    out, marked = [], False
    for r in rows:
        if _finite(r[v]) and outside(r[v], r[lo], r[hi]):
            r = (*r[:v], f"{r[v]:.4g}{DAGGER}", *r[v + 1:])
            marked = True
        out.append(r)
    return out, marked


def table1_by_direction(names: list[str], rows: list[tuple]) -> list[tuple[str, tuple[list[str], list[tuple]]]]:
    """`paper_table`'s rows (model, feature_extractor, <metric>_<task> ...) as one table per direction:
    image->map (RMSE) and map->image (FID, with its feature extractor), a row only where it has a value."""
    out = []
    for metric, (direction, note) in DIRECTIONS.items():
        cols = [i for i, n in enumerate(names) if n.startswith(f"{metric}_")]
        if not cols:
            continue
        keep = [names.index("model")] + ([names.index("feature_extractor")] if metric == "fid" else [])
        header = ["model"] + (["features"] if metric == "fid" else []) + [names[i].removeprefix(f"{metric}_") for i in cols]
        body = [tuple(r[i] for i in keep + cols) for r in rows if any(r[i] is not None for i in cols)]
        out.append((f"Table 1, {direction} ({note})", (header, body)))
    return out


def sensitivity_table(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    """Example sensitivity (`pd_eval.benchmark.sensitivity_rows`), one row per task: how much the output
    moves when the pair is zeroed or is another task's (`output_change`, RMSE between the two outputs),
    and the per-image MSE against the target under that pair minus under its own (> 0: its own pair
    does better), each with its 95% interval. 'reads its pair' when the other task's pair changes the
    answer beyond the interval (its paired difference's interval excludes 0)."""
    from pd_eval.benchmark import EMPTY_PAIR, OTHER_PAIR

    by = {(r["model_id"], r["task"], r["metric"]): r for r in rows}
    tasks = sorted({t for (m, t, k) in by if m in (EMPTY_PAIR, OTHER_PAIR) and k == "paired_diff_mse"})
    cell = lambda r: with_interval(r["value"], r["ci_low"], r["ci_high"]) if r else ""  # noqa: E731
    body = []
    for t in tasks:
        z, o = by.get((EMPTY_PAIR, t, "paired_diff_mse")), by.get((OTHER_PAIR, t, "paired_diff_mse"))
        reads = "yes" if o and _finite(o["ci_low"]) and (o["ci_low"] > 0 or o["ci_high"] < 0) else "no" if o else ""
        helps = "yes" if z and _finite(z["ci_low"]) and z["ci_low"] > 0 else "no" if z else ""
        body.append((t, cell(by.get((EMPTY_PAIR, t, "output_change"))), cell(z), cell(by.get((OTHER_PAIR, t, "output_change"))),
                     cell(o), helps, reads, (z or o or {}).get("n", "")))
    return (["task", "output change, pair zeroed", "MSE zeroed - own", "output change, other task's pair",
             "MSE other - own", "own pair beats zeroed", "reads its pair", "n"], body)


def paired_fidelity_table(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    """map->image outputs against the query's own true image, pixel by pixel: model x task, RMSE (0..1)
    and SSIM with intervals. Pixel RMSE rewards blur (the mean image scores well), so SSIM stands beside it."""
    tasks = sorted({r["task"] for r in rows if r["task"].endswith("->image") and r["metric"] == "ssim"})
    models = sorted({r["model_id"] for r in rows if r["task"] in tasks and r["metric"] == "ssim"})
    by = {(r["model_id"], r["task"], r["metric"]): r for r in rows}
    body = []
    for m in models:
        for t in tasks:
            rm, ss = by.get((m, t, "rmse")), by.get((m, t, "ssim"))
            if rm and ss:
                body.append((m, t, with_interval(rm["value"], rm["ci_low"], rm["ci_high"]),
                             with_interval(ss["value"], ss["ci_low"], ss["ci_high"]), rm["n"]))
    return (["model", "task", "RMSE (lower is better)", "SSIM (higher is better)", "n"], body)


def controllability_table(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    """map->image outputs read back into their query's modality (`pd_eval.reannotate`): task x model,
    every controllability metric with its interval; `baseline/true-image` is the ceiling (the query's
    own picture read back), the re-annotator named in the last column."""
    ctrl = [r for r in rows if r["metric"].startswith("ctrl_") and not r["task"].startswith("read:")]
    order = lambda m: (m == "baseline/true-image", m.startswith("baseline/"), m)  # noqa: E731
    body = [(r["task"], r["model_id"], r["metric"].removeprefix("ctrl_"), with_interval(r["value"], r["ci_low"], r["ci_high"]),
             r["n"], r["feature_extractor"]) for r in sorted(ctrl, key=lambda r: (r["task"], r["metric"], order(r["model_id"])))]
    return ["task", "model", "metric", "value [95% interval]", "n", "re-annotator"], body


def reader_table(rows: list[dict]) -> tuple[tuple[list[str], list[tuple]], list[str]]:
    """The re-annotator's own test error beside the mean map's, per modality, and the modalities where
    it is not informative (it does not beat the mean map by the margin of `pd_eval.reader.reader_quality`)."""
    by = {(r["model_id"], r["task"], r["metric"]): r for r in rows if r["task"].startswith("read:")}
    body, weak = [], []
    for (m, task, metric), r in sorted(by.items()):
        if m != "re-annotator" or metric == "informative":
            continue
        mean = by.get(("re-annotator/mean-map", task, metric))
        ok = by.get(("re-annotator", task, "informative"))
        informative = bool(ok and ok["value"] >= 0.5)
        if not informative:
            weak.append(task.removeprefix("read:"))
        body.append((task.removeprefix("read:"), metric.removeprefix("ctrl_"), f"{r['value']:.3f}",
                     f"{mean['value']:.3f}" if mean else "", "yes" if informative else "NO", r["n"], r["feature_extractor"]))
    return (["modality", "metric", "re-annotator", "mean map", "informative", "n", "re-annotator id"], body), weak
