"""In-context task inference: with the text removed, does the output do the task the example pair shows?

Each query image gets three prompts with the same seed and an empty text, whose example pairs
(from the example image of its materialised prompt, under `data.pairing`) show image->depth,
image->hed and image->seg. An output is classified as the task whose true map of the query it is
closest to in RMSE, unless the example pair's own target is at least as close: then it is
`copied-example` and earns no credit (the task done on the query, not the example's answer
copied). A model that reads its example pair lands on the diagonal of the confusion matrix; the
copy-example baseline (the example's target as the answer) is scored the same way. The queries are
those of the first materialised image->depth prompts, so every model run sees the same ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pd_data.dataset import SplitData
from pd_data.tasks import FORWARD_TASKS, Prompt, get_task
from pd_eval.baselines import COPY_EXAMPLE
from pd_data.schema import MetricRow
from pd_eval.benchmark import _save_pngs, evaluation_prompts, metric_row, slug
from pd_eval.config import EvalConfig
from pd_eval.metrics import MetricValue, bootstrap, per_image_mse
from pd_model.base import BaseModel
from pd_model.controlnet import kind_of
from pd_model.sampling import generate
from pd_model.visuals import prompt_grid

FORWARD: tuple[str, ...] = FORWARD_TASKS
COPIED = "copied-example"  # the predicted "task" of an output nearest to the example pair's target
PREDICTED: tuple[str, ...] = (*FORWARD, COPIED)
MODEL_ID = "prompt-diffusion/no-text"
COPY_BASELINE = COPY_EXAMPLE  # scored here as well: copying must earn no credit
TASK = "task-inference"  # the metrics row's task; its metric is "accuracy"


def inference_prompts(data: SplitData, prompts: list[dict], n: int) -> list[tuple[dict, str, Prompt]]:
    """(materialised row, shown task, prompt with empty text) for the first `n` image->depth rows x FORWARD."""
    rows = [r for r in prompts if r["task"] == FORWARD[0]][:n]
    out = []
    for r in rows:
        for task in FORWARD:
            p = data.prompt(get_task(task), r["example_id"], r["query_id"])
            out.append((r, task, Prompt(p.task, p.example_source, p.example_target, p.query, p.target, "")))
    return out


def classify(output: np.ndarray, truths: dict[str, np.ndarray], example_target: np.ndarray | None = None) -> str:
    """The task whose true map of the query is nearest to `output` (per-image RMSE); `COPIED` when
    `example_target` (the shown pair's target) is at least as near as every one of them."""
    names = ([COPIED] if example_target is not None else []) + list(truths)
    refs = ([example_target] if example_target is not None else []) + [truths[k] for k in truths]
    mse = per_image_mse(np.stack([output] * len(names)), np.stack(refs))
    return names[int(np.argmin(mse))]  # argmin takes the first of equals: a tie with the copy is a copy


def confusion(shown: list[str], predicted: list[str], rows: tuple[str, ...] = FORWARD,
              columns: tuple[str, ...] = PREDICTED) -> np.ndarray:
    """(len(rows), len(columns)) counts: rows = task the pair shows, columns = what the output follows."""
    m = np.zeros((len(rows), len(columns)), dtype=np.int64)
    for s, p in zip(shown, predicted):
        m[rows.index(s), columns.index(p)] += 1
    return m


def accuracy(shown: list[str], predicted: list[str], resamples: int, seed: int) -> MetricValue:
    hit = np.array([s == p for s, p in zip(shown, predicted)], dtype=np.float64)
    lo, hi = bootstrap(lambda idx: float(hit[idx].mean()), len(hit), resamples, seed)
    return MetricValue(float(hit.mean()), lo, hi, len(hit))


def scored(model_id: str, outputs: np.ndarray, items: list[tuple[dict, str, Prompt]], data: SplitData,
           cfg: EvalConfig) -> tuple[MetricRow, list[dict]]:
    """(accuracy metric row, confusion cells) of `outputs`, one per item."""
    shown = [t for _, t, _ in items]
    predicted = [classify(o, {t: data.arrays[r["query_id"]][get_task(t).target] for t in FORWARD}, p.example_target)
                 for o, (r, _, p) in zip(outputs, items)]
    m = confusion(shown, predicted)
    cells = [{"model_id": model_id, "shown_task": s, "predicted_task": p, "count": int(m[i, j])}
             for i, s in enumerate(FORWARD) for j, p in enumerate(PREDICTED)]
    return metric_row(model_id, TASK, "accuracy", accuracy(shown, predicted, cfg.bootstrap, cfg.seed), "", cfg), cells


def run_task_inference(base: BaseModel, controlnet, data: SplitData, prompts_path: Path, cfg: EvalConfig,
                       out_dir: Path) -> tuple[list[MetricRow], list[dict], list[dict]]:
    """Generate, save PNGs and a grid, classify; returns (accuracy metric rows, confusion cells, sample
    rows) of the model and of the copy-example baseline."""
    items = inference_prompts(data, evaluation_prompts(prompts_path, cfg), cfg.task_inference_queries)
    if not items:
        raise ValueError("task inference needs materialised image->depth prompts; none were found")
    built, seeds = [p for _, _, p in items], [r["seed"] for r, _, _ in items]
    pair_guidance = cfg.pair_guidance_scale if kind_of(controlnet) == "prompt-diffusion" else None  # CN(FT) has no pair
    outputs = np.concatenate([
        generate(base, controlnet, built[i:i + cfg.batch_size], seeds[i:i + cfg.batch_size], scheduler=cfg.scheduler,
                 steps=cfg.steps, guidance_scale=cfg.guidance_for(get_task(FORWARD[0])), negative_prompt=cfg.negative_prompt,
                 pair_guidance_scale=pair_guidance)
        for i in range(0, len(built), cfg.batch_size)])
    row, cells = scored(MODEL_ID, outputs, items, data, cfg)
    copy_row, copy_cells = scored(COPY_BASELINE, np.stack([p.example_target for p in built]), items, data, cfg)
    ids = [f"{r['prompt_id']}@{t}" for r, t, _ in items]
    paths = _save_pngs(out_dir / "samples" / slug(MODEL_ID) / TASK, outputs, [slug(i).replace("@", "__") for i in ids])
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    prompt_grid(built[:6], outputs[:6]).save(out_dir / "grids" / f"{slug(MODEL_ID)}__{TASK}.png")
    samples = [{"model_id": MODEL_ID, "task": TASK, "prompt_id": i, "path": str(p)} for i, p in zip(ids, paths)]
    return [row, copy_row], cells + copy_cells, samples
