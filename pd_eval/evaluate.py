"""Evaluate trained model folders on materialised prompts and store the results: the one path of the
evaluate stage and of a retraining round."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from pd_data.dataset import load_split
from pd_data.schema import ConfusionRow, MetricRow, ModelRow, SampleRow
from pd_eval.benchmark import models_under_test, run_benchmark
from pd_eval.config import EvalConfig
from pd_eval.store import replace_evaluation
from pd_model.base import load_base
from pd_model.controlnet import kind_of
from pd_model.pipeline import load_trained


@dataclass(frozen=True)
class Split:
    """Where an evaluation's images, maps and prompts are, and which split they are."""

    images: Path
    annotations: Path
    split: str
    prompts: Path
    pairing: str = "other-layout"
    baselines: bool = True  # score the trivial baselines too (the mean map needs the train split in the same folders)


@dataclass
class Evaluation:
    metrics: list[MetricRow] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    confusion: list[dict] = field(default_factory=list)


def evaluate_folders(base_path: str | Path, folders: dict[str, Path], unseen: tuple[str, ...], where: Split,
                     cfg: EvalConfig, out: Path, task_inference: bool = True) -> Evaluation:
    """Every model folder (name -> folder written by training) under the benchmark of `pd_eval.benchmark`;
    with `task_inference`, the Prompt Diffusion model's in-context task inference too."""
    base = load_base(base_path).freeze()
    nets, unets = {}, {}
    for name, folder in folders.items():
        meta, net, unet = load_trained(folder)
        nets[name] = (kind_of(net), tuple(meta["tasks"]), net)
        if unet is not None:  # trained with train.train_unet_decoder
            unets[name] = unet
    data = load_split(where.images, where.annotations, where.split, where.pairing)
    train = load_split(where.images, where.annotations, "train") if where.baselines else None
    metrics, samples = run_benchmark(base, models_under_test(nets, unseen, unets), data, where.prompts, cfg, out, train)
    result = Evaluation(metrics, samples)
    pd = [name for name, (kind, _, _) in nets.items() if kind == "prompt-diffusion"]
    if task_inference and cfg.task_inference_queries > 0 and pd:
        from pd_eval.task_inference import run_task_inference

        acc, result.confusion, more = run_task_inference(base.with_unet(unets.get(pd[0])), nets[pd[0]][2], data,
                                                         where.prompts, cfg, out)
        result.metrics, result.samples = metrics + acc, samples + more
    return result


def store(db: Path, eval_id: str, models: list[ModelRow], result: Evaluation) -> int:
    """The evaluation's rows, once, each stamped with `eval_id`: rows of an earlier, unfinished attempt at
    this eval_id are replaced in the same transaction (call it holding the evaluation's lock). Returns
    the metric rows stored."""
    now = datetime.now(timezone.utc)
    rows = [replace(m, eval_id=eval_id) for m in models] + [replace(r, eval_id=eval_id, created_at=now) for r in result.metrics]
    rows += [SampleRow(eval_id=eval_id, **r) for r in result.samples]
    rows += [ConfusionRow(eval_id=eval_id, **r) for r in result.confusion]
    replace_evaluation(db, eval_id, rows)
    return len(result.metrics)
