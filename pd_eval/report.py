"""Per-run report: Markdown and HTML with Table 1, per-task metrics with 95% intervals, grids, losses."""
from __future__ import annotations

import html
import shutil
from pathlib import Path

from pd_data.state import atomic_write_bytes
from pd_eval.store import query


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


def _name(model_id: str) -> str:
    return {"prompt-diffusion": "Prompt Diffusion", "cn-ft": "CN(FT)"}.get(model_id, model_id)


def baseline_statements(rows: list[dict]) -> list[str]:
    """Per image->map task: does each model beat both trivial baselines in RMSE? Computed from `rows`
    (metric rows: model_id, task, metric, value, ci_low, ci_high), one sentence per task."""
    from pd_eval.baselines import BASELINES

    rmse = {(r["model_id"], r["task"]): r for r in rows if r["metric"] == "rmse"}
    out = []
    for task in sorted({t for _, t in rmse}):
        base = {b: rmse.get((b, task)) for b in BASELINES}
        if None in base.values():
            continue
        best = min(r["value"] for r in base.values())
        ref = ", ".join(f"{b.split('/')[1]} {r['value']:.3f}" for b, r in base.items())
        parts = []
        for model in sorted(m for m, t in rmse if t == task and m not in BASELINES):
            r = rmse[(model, task)]
            if r["value"] < best:
                sure = " (its 95% interval lies below both)" if r["ci_high"] is not None and r["ci_high"] < best else ""
                parts.append(f"{_name(model)} beats both baselines with {r['value']:.3f}{sure}")
            else:
                lost = [b.split("/")[1] for b, br in base.items() if r["value"] >= br["value"]]
                parts.append(f"{_name(model)} does NOT beat {' and '.join(lost)} ({r['value']:.3f})")
        if parts:
            out.append(f"{task} (baselines: {ref}): " + "; ".join(parts) + ".")
    return out


def build_report(db: Path, run_id: str, eval_id: str, profile: str, eval_dir: Path, loss_png: Path | None,
                 out_dir: Path, notes: list[str]) -> Path:
    """Write `report.md`, `report.html` and their images into `out_dir`; returns the Markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t1 = query(db, "SELECT * EXCLUDE (run_id) FROM paper_table WHERE run_id = ? OR run_id IS NULL "
                   "ORDER BY run_id NULLS LAST, model", [run_id])
    per_task = query(db, "SELECT model_id AS model, task, metric, value, ci_low, ci_high, n, feature_extractor "
                         "FROM metrics WHERE eval_id = ? ORDER BY task, model_id", [eval_id])
    cols, raw = query(db, "SELECT * FROM metrics WHERE eval_id = ?", [eval_id])
    verdicts = baseline_statements([dict(zip(cols, r)) for r in raw])
    images: list[tuple[str, str]] = []
    for g in sorted((eval_dir / "grids").glob("*.png")):
        shutil.copyfile(g, out_dir / g.name)
        images.append((g.stem.replace("__", " / ").replace("-to-", "->"), g.name))
    if loss_png and loss_png.exists():
        shutil.copyfile(loss_png, out_dir / "losses.png")
    title = f"Prompt Diffusion benchmark: run {run_id} (profile {profile})"
    md = [f"# {title}", "", *[f"- {n}" for n in notes], "",
          "## Table 1 layout (FID lower is better; RMSE on a 0..1 scale, lower is better)", "",
          "The paper's rows use Inception-v3 FID on InstructPix2Pix at 256 px; rows of this run use the "
          "feature extractor named in their row, on this run's data: compare rows of one extractor only.", "",
          _md_table(*t1), "", "## Do the trained models beat the trivial baselines? (RMSE, lower is better)", "",
          "Baselines: copy-query answers with the query image; mean-map with the per-pixel mean train map of the task.", "",
          *[f"- {v}" for v in verdicts], "", "## Every metric with its bootstrap 95% interval", "", _md_table(*per_task), ""]
    if loss_png and loss_png.exists():
        md += ["## Training loss", "", "![losses](losses.png)", ""]
    if (out_dir / "base-samples.png").exists():
        md += ["## Base model: text -> image from held-out captions", "", "![base samples](base-samples.png)", ""]
    md += ["## Prompts: example source | example target | query | output | target", ""]
    md += [f"### {cap}\n\n![{cap}]({name})\n" for cap, name in images]
    md_path = out_dir / "report.md"
    atomic_write_bytes(md_path, "\n".join(md).encode())
    body = [f"<h1>{html.escape(title)}</h1>", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>",
            "<h2>Table 1 layout</h2>", _html_table(*t1),
            "<h2>Do the trained models beat the trivial baselines? (RMSE)</h2>",
            "<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in verdicts) + "</ul>", "<h2>Every metric with its 95% interval</h2>",
            _html_table(*per_task)]
    if loss_png and loss_png.exists():
        body += ["<h2>Training loss</h2>", '<img src="losses.png">']
    if (out_dir / "base-samples.png").exists():
        body += ["<h2>Base model: text -> image from held-out captions</h2>", '<img src="base-samples.png">']
    body += ["<h2>Prompts: example source | example target | query | output | target</h2>"]
    body += [f"<h3>{html.escape(cap)}</h3><img src='{name}'>" for cap, name in images]
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    atomic_write_bytes(out_dir / "report.html", page.encode())
    return md_path
