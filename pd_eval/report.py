"""Per-run report: Markdown and HTML from one list of sections: the verdict, where it ran, Table 1 by
direction, the claims against the trivial baselines, bar plots with 95% intervals, unseen-task
generalisation, task inference, every metric, losses, grids. Who beats whom: `pd_eval.claims`; how
a table reads (intervals that miss their estimate marked): `pd_eval.tables`."""
from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np

from pd_core.state import atomic_write_bytes
from pd_eval.claims import CONTROL_HEADLINES, HIGHER, claims_table, verdict
from pd_eval.provenance import where_lines
from pd_eval.store import query
from pd_eval.tables import (OUTSIDE_NOTE, controllability_table, mark_outside, paired_fidelity_table, reader_table,
                            sensitivity_table, table1_by_direction)


def _md_table(names: list[str], rows: list[tuple]) -> str:
    def fmt(v) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(names: list[str], rows: list[tuple]) -> str:
    def fmt(v) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


Block = tuple[str, object]  # ("text", str) | ("list", [str]) | ("table", (names, rows)) | ("image", (caption, file))

METRIC_NOTES = {"fid": "FID, lower is better", "kid": "KID, lower is better", "rmse": "RMSE (0..1), lower is better",
                "ssim": "SSIM, higher is better", "psnr": "PSNR (dB), higher is better"}


def _render_md(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    out = [f"# {title}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""] if heading else []
        for kind, b in blocks:
            if kind == "text":
                out += [b, ""]
            elif kind == "list":
                out += [f"- {x}" for x in b] + [""]
            elif kind == "table":
                out += [_md_table(*b), ""]
            else:
                out += [f"### {b[0]}", "", f"![{b[0]}]({b[1]})", ""] if b[0] else [f"![{b[1]}]({b[1]})", ""]
    return "\n".join(out)


def _render_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        body += [f"<h2>{html.escape(heading)}</h2>"] if heading else []
        for kind, b in blocks:
            if kind == "text":
                body.append(f"<p>{html.escape(b)}</p>")
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b) + "</ul>")
            elif kind == "table":
                body.append(_html_table(*b))
            else:
                body += ([f"<h3>{html.escape(b[0])}</h3>"] if b[0] else []) + [f"<img src='{html.escape(b[1])}'>"]
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def report_tables(db: Path, run_id: str, eval_id: str) -> dict[str, tuple[list[str], list[tuple]]]:
    """The report's tables, by artifact key: Table 1, every metric, generalisation, task inference."""
    return {
        "paper-table": query(db, "SELECT * EXCLUDE (run_id) FROM paper_table WHERE run_id = ? OR run_id IS NULL "
                                 "ORDER BY run_id NULLS LAST, model", [run_id]),
        "metrics": query(db, "SELECT model_id AS model, task, metric, value, ci_low, ci_high, n, feature_extractor "
                             "FROM metrics WHERE eval_id = ? ORDER BY task, metric, model_id", [eval_id]),
        "generalization": query(db, "SELECT task, metric, condition, value, ci_low, ci_high, n, feature_extractor "
                                    "FROM generalization WHERE run_id = ? ORDER BY task, metric, condition", [run_id]),
        "task-inference": query(db, "SELECT model_id AS model, shown_task AS \"example pair shows\", "
                                    "list(count ORDER BY predicted_task) AS \"output follows copied-example, depth, hed, seg\" "
                                    "FROM task_inference WHERE eval_id = ? GROUP BY ALL ORDER BY 1, 2", [eval_id]),
    }


KID_NOTE = ("KID is the unbiased estimator of the kernel distance, which is negative when two sets are closer "
            "than its noise: read a negative KID as 0 (no difference measured). The figure draws such values and "
            "interval ends at 0; the tables keep them as computed.")


def _clipped(r: dict) -> dict:
    """A KID row as the figure draws it: below 0 at 0 (`KID_NOTE`)."""
    if r["metric"] != "kid":
        return r
    return r | {k: None if r[k] is None else max(r[k], 0.0) for k in ("value", "ci_low", "ci_high")}


def _negative_kid(rows: list[dict], tasks: set[str] | None = None) -> bool:
    return any(r["metric"] == "kid" and (tasks is None or r["task"] in tasks)
               and any(r[k] is not None and r[k] < 0 for k in ("value", "ci_low")) for r in rows)


def _bars(rows: list[dict], tasks: set[str], out_dir: Path, name: str, what: str) -> list[Block]:
    """One figure over `tasks`, a panel per metric, models side by side with their 95% intervals; KID
    clipped at 0, said in its panel's title and under the figure."""
    clip = _negative_kid(rows, tasks)
    notes = METRIC_NOTES | ({"kid": "KID, lower is better (below 0 drawn at 0)"} if clip else {})
    blocks = _panel_bars({notes[m]: [r for r in map(_clipped, rows) if r["metric"] == m and r["task"] in tasks]
                          for m in METRIC_NOTES}, out_dir, name, f"{what}: 95% bootstrap intervals as error bars")
    return blocks + ([("text", KID_NOTE)] if blocks and clip else [])


def _marked(table: tuple[list[str], list[tuple]]) -> list[Block]:
    """A table whose values its intervals miss are marked, and the footnote that says why."""
    names, rows = table
    rows, marked = mark_outside(names, rows)
    return [("table", (names, rows))] + ([("text", OUTSIDE_NOTE)] if marked else [])


def _where(db: Path, run_id: str) -> list[Block]:
    _, found = query(db, "SELECT precision, machine FROM runs WHERE run_id = ?", [run_id])
    precision, machine = found[0] if found else (None, None)
    return [("list", where_lines(precision, json.loads(machine) if machine else None))]


def _study_sections(rows: list[dict], out_dir: Path) -> list[tuple[str, list[Block]]]:
    """Paired fidelity of the map->image outputs and the example-sensitivity study, where measured."""
    out = []
    fidelity = paired_fidelity_table(rows)
    if fidelity[1]:
        out.append(("map->image against the query's own true image (paired fidelity)", [
            ("text", "Each output beside the picture its query map was made from. FID cannot see whether an output "
                     "follows its query (a real picture in another layout wins it); these can, but pixel RMSE also "
                     "rewards blur: compare with the baselines' rows (copy-example, and mean-map: the mean image)."),
            *_marked(fidelity)]))
    ctrl = controllability_table(rows)
    if ctrl[1]:
        headlines = {r["metric"] for r in rows if r["metric"] in CONTROL_HEADLINES and r["model_id"] == "prompt-diffusion"
                     and not r["task"].startswith("read:")}
        ctrl_bars = _panel_bars({f"control {m.removeprefix('ctrl_').replace('_', ' ')}, "
                                 f"{'higher' if m in HIGHER else 'lower'} is better":
                                 [r for r in rows if r["metric"] == m and not r["task"].startswith("read:")]
                                 for m in sorted(headlines)}, out_dir, "controllability.png",
                                "controllability of map->image outputs: 95% intervals as error bars")
        (quality, weak) = reader_table(rows)
        out.append(("Controllability: do map->image outputs follow their query map?", [
            ("text", "Each output is read back into its query's modality by a re-annotator and compared with the query "
                     "map (ControlNet++'s test): depth RMSE, SSIM of soft edges (MS-SSIM at 176 px and above), mIoU and "
                     "pixel accuracy of segmentation, F1 of Canny edges, angular error of normals. baseline/true-image is "
                     "the ceiling: the query's own picture read back. The map->image claims use these numbers."),
            *_marked(ctrl), *ctrl_bars,
            *([("text", "The re-annotator's own error on this split's real images, beside the mean map answering "
                        "every image:"), ("table", quality)] if quality[1] else []),
            *([("text", f"NOT INFORMATIVE for {', '.join(weak)}: the re-annotator does not beat the mean map by a "
                        f"wide margin there, so its controllability numbers cannot tell a model that follows its "
                        f"query from one that does not.")] if weak else [])]))
    sens = sensitivity_table(rows)
    if sens[1]:
        out.append(("Example sensitivity: does the output depend on the example pair?", [
            ("text", "Same query, seed and text; the example pair zeroed, or replaced by the same example image's pair "
                     "of another task of the same direction. Output change: RMSE between the two outputs (0: the pair "
                     "changed nothing). MSE differences are against each prompt's target, paired per prompt, with "
                     "BCa 95% intervals; above 0, the model's own pair does better."),
            ("table", sens),
            *_panel_bars({"output change (RMSE between outputs, 0..1)": [r for r in rows if r["metric"] == "output_change"],
                          "MSE under the changed pair - own pair (> 0: own pair better)":
                          [r for r in rows if r["metric"] == "paired_diff_mse"]},
                         out_dir, "sensitivity.png", "example sensitivity: 95% intervals as error bars")]))
    return out


def _panel_bars(panels: dict[str, list[dict]], out_dir: Path, name: str, title: str) -> list[Block]:
    """A figure of metric rows by panel title (`pd_eval.visuals.metric_bars`), or nothing without rows."""
    from pd_eval.visuals import metric_bars

    drawn = {k: [{"task": r["task"], "model": r["model_id"], **{c: r[c] for c in ("value", "ci_low", "ci_high")}}
                 for r in v] for k, v in panels.items() if v}
    if not drawn:
        return []
    metric_bars(drawn, out_dir / name, title)
    return [("image", ("", name))]


def _replicate_section(rows: list[dict], reps: list[dict], out_dir: Path) -> list[tuple[str, list[Block]]]:
    """The spread of the replicated models across training replicates, in each task's verdict metric."""
    from pd_data.tasks import TASKS
    from pd_eval.claims import verdict_metric
    from pd_eval.replicates import spread_table

    keys = {(r["model_id"], r["task"], r["metric"]) for r in rows}
    metrics = {t: verdict_metric(t, keys)[0] for t in {r["task"] for r in reps} if t in TASKS}
    table = spread_table(reps, metrics)
    if not table[1]:
        return []
    picked = [r for r in reps if metrics.get(r["task"]) == r["metric"] and (r["model_id"], r["task"]) in
              {(row[0], row[1]) for row in table[1]}]
    bars = _panel_bars({m: [r | {"model_id": f"{r['model_id']} r{r['replicate']}"} for r in picked if r["metric"] == m]
                        for m in sorted({r["metric"] for r in picked})}, out_dir, "replicates.png",
                       "each training replicate with its 95% prompt interval")
    return [("Training replicates: how much does a retraining move each number?", [
        ("text", "Each replicate is the same model trained again on the same data and prompts from another seed, and "
                 "scored on the same prompts with the same sampling seeds. Table 1 and the claims above give the mean "
                 "over replicates with an interval over replicates and prompts (a two-level bootstrap, "
                 "pd_eval.replicates); a claim is made only where every replicate agrees."),
        ("table", table), *bars])]


def _task_inference_section(db: Path, eval_id: str, rows: list[dict], tables: dict, out_dir: Path) -> list[tuple[str, list[Block]]]:
    """The confusion matrix of in-context task inference and its plot; none when it was not run."""
    from pd_eval.task_inference import COPY_BASELINE, FORWARD, MODEL_ID, PREDICTED
    from pd_eval.visuals import confusion_plot

    _, cells = query(db, "SELECT shown_task, predicted_task, count FROM task_inference WHERE eval_id = ? AND model_id = ?",
                     [eval_id, MODEL_ID])
    if not cells:
        return []
    m = np.zeros((len(FORWARD), len(PREDICTED)), dtype=np.int64)
    for s, p, c in cells:
        m[FORWARD.index(s), PREDICTED.index(p)] += c
    acc = next(r for r in rows if r["model_id"] == MODEL_ID and r["metric"] == "accuracy")
    copy = next((r for r in rows if r["model_id"] == COPY_BASELINE and r["metric"] == "accuracy"), None)
    confusion_plot(m, [t.split("->")[-1] for t in FORWARD], out_dir / "task-inference.png",
                   "text removed: which task does the output follow?", [t.split("->")[-1] for t in PREDICTED])
    return [("In-context task inference (text removed)", [
        ("text", f"Same query and seed, empty text, example pairs of image->depth / hed / seg; each output is "
                 f"classified as the task whose true map of the query it is nearest to (RMSE), or as "
                 f"copied-example when the example pair's own target is at least as near (no credit). Accuracy "
                 f"{acc['value']:.3f} (95% interval {acc['ci_low']:.3f} to {acc['ci_high']:.3f}, n = {acc['n']}; "
                 f"chance 0.333)" + (f"; the copy-example baseline scores {copy['value']:.3f}." if copy else ".")),
        ("table", tables["task-inference"]), ("image", ("", "task-inference.png"))])]


def _picture_sections(eval_dir: Path, loss_png: Path | None, out_dir: Path) -> list[tuple[str, list[Block]]]:
    """Loss curves, the base's samples and the prompt grids, copied beside the report."""
    sections: list[tuple[str, list[Block]]] = []
    if loss_png and loss_png.exists():
        shutil.copyfile(loss_png, out_dir / "losses.png")
        sections.append(("Training loss", [("image", ("", "losses.png"))]))
    if (out_dir / "base-samples.png").exists():
        sections.append(("Base model: text -> image from held-out captions (each beside its held-out image)",
                         [("image", ("", "base-samples.png"))]))
    grids: list[Block] = []
    for g in sorted((eval_dir / "grids").glob("*.png")):
        shutil.copyfile(g, out_dir / g.name)
        grids.append(("image", (g.stem.replace("__", " / ").replace("-to-", "->"), g.name)))
    sections.append(("Prompts: example source | example target | query | output | target", grids))
    return sections


def build_report(db: Path, run_id: str, eval_id: str, profile: str, eval_dir: Path, loss_png: Path | None,
                 out_dir: Path, notes: list[str]) -> Path:
    """Write `report.md`, `report.html` and their images into `out_dir`; returns the Markdown path."""
    from pd_data.tasks import TASKS

    out_dir.mkdir(parents=True, exist_ok=True)
    tables = report_tables(db, run_id, eval_id)
    cols, raw = query(db, "SELECT * FROM metrics WHERE eval_id = ?", [eval_id])
    rows = [dict(zip(cols, r)) for r in raw]
    cols, raw = query(db, "SELECT * FROM replicate_metrics WHERE eval_id = ?", [eval_id])
    reps = [dict(zip(cols, r)) for r in raw]
    trained = {n for n, t in TASKS.items() if t.trained}
    unseen = {r["task"] for r in rows if r["task"] in TASKS and not TASKS[r["task"]].trained}
    sections: list[tuple[str, list[Block]]] = [("", [("text", line) for line in verdict(rows, reps)]),
                                                ("Where this ran", _where(db, run_id)), ("Settings", [("list", notes)])]
    for heading, table in table1_by_direction(*tables["paper-table"]):
        intro = [("text", "The paper's rows use Inception-v3 FID on InstructPix2Pix at 256 px; rows of this run use "
                          "the features named in their row, on this run's data: compare rows of one extractor only.")]
        sections.append((heading, (intro if "FID" in heading else []) + [("table", table)]))
    claims = claims_table(rows, reps)
    sections.append(("Do the models beat the trivial baselines?", [
        ("text", "Baselines: copy-example answers with the example pair's target (for map->image, a real image of "
                 "the query's group); for image->map also copy-query (the query image) and mean-map (the per-pixel "
                 "mean train map of the task). A model that does not beat copy-example may be copying its example. "
                 "\"beats all\": its value is below every baseline's; \"interval clear\": so is its 95% interval's "
                 "upper end."),
        *(_marked(claims) if claims[1] else [("text", "no task with both a model and a baseline in this evaluation")])]))
    sections.append(("Trained tasks: every model side by side", _bars(rows, trained, out_dir, "bars.png", "trained tasks")))
    sections += _study_sections(rows, out_dir)
    sections += _replicate_section(rows, reps, out_dir)
    if unseen:
        sections.append(("Unseen tasks: zero-shot generalisation", [
            ("text", "Conditions: prompt-diffusion (zero-shot, with the example pair), prompt-diffusion/empty-pair "
                     "(the pair zeroed), cn-ft/nearest (the CN(FT) of the nearest trained task), cn-ft/oracle "
                     "(a CN(FT) trained on the unseen task, when the profile trains one); baselines for image->map."),
            *_marked(tables["generalization"]), *_bars(rows, unseen, out_dir, "generalization.png", "unseen tasks")]))
    sections += _task_inference_section(db, eval_id, rows, tables, out_dir)
    sections.append(("Every metric with its bootstrap 95% interval", [
        *_marked(tables["metrics"]), *([("text", KID_NOTE)] if _negative_kid(rows) else [])]))
    sections += _picture_sections(eval_dir, loss_png, out_dir)
    title = f"Prompt Diffusion benchmark: run {run_id} (profile {profile})"
    md_path = out_dir / "report.md"
    atomic_write_bytes(md_path, _render_md(title, sections).encode())
    atomic_write_bytes(out_dir / "report.html", _render_html(title, sections).encode())
    return md_path


def recipe_line(train) -> str:
    """"recipe: the paper's" or "recipe (departs from the paper's): drop_text=0.5, ..." (`TrainConfig.departures`)."""
    off = train.departures()
    return "recipe: the paper's" if not off else \
        "recipe (departs from the paper's): " + ", ".join(f"{k}={v}" for k, v in off.items())


def run_notes(profile, keys: dict[str, str], budget_rule: str) -> list[str]:
    """The settings a reader needs to interpret a run's numbers, one line each."""
    ev, tr = profile.eval, profile.train
    pair = f", example-pair guidance {ev.pair_guidance_scale}" if ev.pair_guidance_scale else ""
    pair += f", text guidance {ev.map_guidance_scale} for image->map" if ev.map_guidance_scale is not None else ""
    trained = ("each ControlNet with its own copy of the UNet decoder (train_unet_decoder=True; the base's encoder "
               "and text encoder frozen)" if tr.train_unet_decoder else "the ControlNets only (base frozen)")
    return [f"profile: {profile.name}; evaluation protocol: {ev.protocol} ({ev.scheduler}, {ev.steps} steps, "
            f"guidance {ev.guidance_scale}{pair})",
            f"trained: {trained}; CN(FT) budget: {budget_rule}",
            f"pairing: {profile.data.pairing} (where each training and evaluation prompt takes its example pair from)",
            recipe_line(tr),
            f"training replicates: Prompt Diffusion {tr.replicates}, each CN(FT) {tr.baseline_replicates}",
            "stage keys: " + ", ".join(f"{s}={k}" for s, k in keys.items())]


def build_run_report(db: Path, run_id: str, profile, keys: dict[str, str], loss_files: dict[str, Path], base_samples: Path,
                     budget_rule: str, eval_dir: Path, out_dir: Path) -> Path:
    """The report of one benchmark run: its notes, loss curves (name -> losses.json) and the base's
    samples (when the base was trained) around `build_report`'s sections."""
    import json

    from pd_eval.visuals import loss_plot

    curves = {name: json.loads(path.read_text())["loss"] for name, path in loss_files.items()}
    png = loss_plot(curves, out_dir / "losses-src.png")
    if base_samples.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base_samples, out_dir / "base-samples.png")
    return build_report(db, run_id, keys["evaluate"], profile.name, eval_dir, png, out_dir, run_notes(profile, keys, budget_rule))
