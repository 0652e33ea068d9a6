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
from pd_eval.schema import MetricRow
from pd_data.tasks import FORWARD_TASKS, get_task
from pd_eval.baselines import COPY_EXAMPLE
from pd_eval.benchmark import metric_row, save_grid, slug
from pd_eval.config import EvalConfig
from pd_eval.generation import Item, Request, paths, read_pngs
from pd_eval.metrics import MetricValue, bootstrap, per_image_mse

FORWARD: tuple[str, ...] = FORWARD_TASKS
COPIED = "copied-example"  # the predicted "task" of an output nearest to the example pair's target
PREDICTED: tuple[str, ...] = (*FORWARD, COPIED)
MODEL_ID = "prompt-diffusion/no-text"
COPY_BASELINE = COPY_EXAMPLE  # scored here as well: copying must earn no credit
TASK = "task-inference"  # the metrics row's task; its metric is "accuracy"


def inference_request(prompts: list[dict], n: int, checkpoint: str, cfg: EvalConfig) -> Request:
    """The first `n` image->depth prompts x FORWARD: each query with the example pair of every forward
    task, the text removed, at the guidance of image->depth."""
    rows = [r for r in prompts if r["task"] == FORWARD[0]][:n]
    if not rows:
        raise ValueError("task inference needs materialised image->depth prompts; none were found")
    its = tuple(Item(name=slug(f"{r['prompt_id']}@{t}").replace("@", "__"), prompt_id=f"{r['prompt_id']}@{t}", task=t,
                     example_id=r["example_id"], query_id=r["query_id"], seed=int(r["seed"])) for r in rows for t in FORWARD)
    return Request(model_id=MODEL_ID, checkpoint=checkpoint, task=TASK, guidance=cfg.guidance_for(get_task(FORWARD[0])),
                   folder=f"samples/{slug(MODEL_ID)}/{TASK}", items=its, no_text=True)


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


def scored(model_id: str, outputs: np.ndarray, r: Request, data: SplitData, cfg: EvalConfig) -> tuple[MetricRow, list[dict]]:
    """(accuracy metric row, confusion cells) of `outputs`, one per item of `r`."""
    shown = [it.task for it in r.items]
    predicted = [classify(o, {t: data.arrays[it.query_id][get_task(t).target] for t in FORWARD},
                          data.prompt(get_task(it.task), it.example_id, it.query_id).example_target)
                 for o, it in zip(outputs, r.items)]
    m = confusion(shown, predicted)
    cells = [{"model_id": model_id, "shown_task": s, "predicted_task": p, "count": int(m[i, j])}
             for i, s in enumerate(FORWARD) for j, p in enumerate(PREDICTED)]
    return metric_row(model_id, TASK, "accuracy", accuracy(shown, predicted, cfg.bootstrap, cfg.seed), "", cfg), cells


def score_task_inference(out: Path, r: Request, data: SplitData, cfg: EvalConfig) -> tuple[list[MetricRow], list[dict]]:
    """(accuracy rows, confusion cells) of the model, from its PNGs, and of the copy-example baseline;
    writes the grid."""
    row, cells = scored(MODEL_ID, read_pngs(paths(out, r)), r, data, cfg)
    copies = np.stack([data.prompt(get_task(it.task), it.example_id, it.query_id).example_target for it in r.items])
    copy_row, copy_cells = scored(COPY_BASELINE, copies, r, data, cfg)
    save_grid(out, r, data, f"{slug(MODEL_ID)}__{TASK}")
    return [row, copy_row], cells + copy_cells
