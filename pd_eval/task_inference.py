"""In-context task inference: with the text removed, does the output follow the task the example pair shows?

Each query image gets three prompts with the same seed and an empty text, whose example pairs
(from another image of the query's group) show image->depth, image->hed and image->seg. An output
is classified as the modality whose true map of the query it is closest to in RMSE; a model that
reads its example pair lands on the diagonal of the confusion matrix. The queries are those of the
first materialised image->depth prompts, so every model run sees the same ones.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pd_data.dataset import SplitData
from pd_data.tasks import Prompt, get_task
from pd_eval.benchmark import _row, _save_pngs, evaluation_prompts, slug
from pd_eval.config import EvalConfig
from pd_eval.metrics import MetricValue, bootstrap, per_image_mse
from pd_eval.visuals import prompt_grid
from pd_model.base import BaseModel
from pd_model.sampling import generate

FORWARD: tuple[str, ...] = ("image->depth", "image->hed", "image->seg")
MODEL_ID = "prompt-diffusion/no-text"
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


def classify(output: np.ndarray, truths: dict[str, np.ndarray]) -> str:
    """The task whose true map of the query is nearest to `output` (per-image RMSE)."""
    names = list(truths)
    mse = per_image_mse(np.stack([output] * len(names)), np.stack([truths[k] for k in names]))
    return names[int(np.argmin(mse))]


def confusion(shown: list[str], predicted: list[str], labels: tuple[str, ...] = FORWARD) -> np.ndarray:
    """(len(labels), len(labels)) counts: rows = task the pair shows, columns = task the output follows."""
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for s, p in zip(shown, predicted):
        m[labels.index(s), labels.index(p)] += 1
    return m


def accuracy(shown: list[str], predicted: list[str], resamples: int, seed: int) -> MetricValue:
    hit = np.array([s == p for s, p in zip(shown, predicted)], dtype=np.float64)
    lo, hi = bootstrap(lambda idx: float(hit[idx].mean()), len(hit), resamples, seed)
    return MetricValue(float(hit.mean()), lo, hi, len(hit))


def run_task_inference(base: BaseModel, controlnet, data: SplitData, prompts_path: Path, cfg: EvalConfig,
                       out_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """Generate, save PNGs and a grid, classify; returns (accuracy metric row, confusion cells, sample rows)."""
    eff = cfg.effective()
    items = inference_prompts(data, evaluation_prompts(prompts_path, cfg), cfg.task_inference_queries)
    if not items:
        raise ValueError("task inference needs materialised image->depth prompts; none were found")
    t0 = time.perf_counter()
    built, seeds = [p for _, _, p in items], [r["seed"] for r, _, _ in items]
    outputs = np.concatenate([
        generate(base, controlnet, built[i:i + eff.batch_size], seeds[i:i + eff.batch_size], scheduler=eff.scheduler,
                 steps=eff.steps, guidance_scale=eff.guidance_scale, negative_prompt=eff.negative_prompt,
                 pair_guidance_scale=eff.pair_guidance_scale)
        for i in range(0, len(built), eff.batch_size)])
    shown = [t for _, t, _ in items]
    predicted = [classify(o, {t: data.arrays[r["query_id"]][get_task(t).target] for t in FORWARD})
                 for o, (r, _, _) in zip(outputs, items)]
    m = confusion(shown, predicted)
    cells = [{"model_id": MODEL_ID, "shown_task": s, "predicted_task": p, "count": int(m[i, j])}
             for i, s in enumerate(FORWARD) for j, p in enumerate(FORWARD)]
    row = _row(MODEL_ID, TASK, "accuracy", accuracy(shown, predicted, cfg.bootstrap, cfg.seed), "", cfg,
               time.perf_counter() - t0)
    ids = [f"{r['prompt_id']}@{t}" for r, t, _ in items]
    paths = _save_pngs(out_dir / "samples" / slug(MODEL_ID) / TASK, outputs, [slug(i).replace("@", "__") for i in ids])
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    prompt_grid(built[:6], outputs[:6]).save(out_dir / "grids" / f"{slug(MODEL_ID)}__{TASK}.png")
    samples = [{"model_id": MODEL_ID, "task": TASK, "prompt_id": i, "path": str(p)} for i, p in zip(ids, paths)]
    return [row], cells, samples
