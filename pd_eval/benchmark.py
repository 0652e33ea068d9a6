"""Benchmark generation: every model under test on the same materialised prompts and seeds, then metrics.

Beside Table 1 (trained tasks), the unseen tasks are run under four conditions, each its own
model_id: `prompt-diffusion` (zero-shot, with the example pair), `prompt-diffusion/empty-pair`
(the pair zeroed as in training dropout), `cn-ft/nearest` (the CN(FT) of the nearest trained task,
`TaskSpec.nearest`) and `cn-ft/oracle` (a CN(FT) trained on the unseen task, when the profile
trains one)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from pd_data.dataset import SplitData
from pd_data.schema import MetricRow
from pd_data.tasks import TaskSpec, get_task
from pd_eval.baselines import baseline_outputs, baselines_for
from pd_eval.config import EvalConfig
from pd_eval.features import load_extractor
from pd_eval.metrics import MetricValue, fid, kid, map_similarity, rmse
from pd_model.base import BaseModel
from pd_model.controlnet import as_kind, kind_of
from pd_model.sampling import generate
from pd_model.visuals import prompt_grid


@dataclass(frozen=True)
class ModelUnderTest:
    model_id: str             # the row of Table 1 ("prompt-diffusion", "cn-ft") or a condition ("cn-ft/nearest", ...)
    checkpoint: str           # which trained network: "prompt-diffusion", "cn-ft_depth-to-image", ...
    controlnet: object        # a loaded ControlNet (Prompt Diffusion or stock)
    tasks: tuple[str, ...]    # the tasks it is benchmarked on
    empty_pair: bool = False  # Prompt Diffusion with its example pair zeroed
    unet: object | None = None  # its own UNet when trained with train.train_unet_decoder, else the base's


def models_under_test(nets: dict[str, tuple[str, tuple[str, ...], object]], unseen: tuple[str, ...],
                      unets: dict[str, object] | None = None) -> list[ModelUnderTest]:
    """Checkpoint name -> (kind, trained tasks, loaded ControlNet) to every (model_id, tasks) benchmarked.

    A CN(FT) trained on an unseen task is that task's oracle; the CN(FT) of a trained task also
    answers the unseen tasks that name it as nearest. `unets`: checkpoints that trained their own decoder."""
    out = []
    for name, (kind, tasks, net) in nets.items():
        if as_kind(kind) == "prompt-diffusion":
            out.append(ModelUnderTest("prompt-diffusion", name, net, tasks + unseen))
            if unseen:
                out.append(ModelUnderTest("prompt-diffusion/empty-pair", name, net, unseen, empty_pair=True))
        elif set(tasks) <= set(unseen):
            out.append(ModelUnderTest("cn-ft/oracle", name, net, tasks))
        else:
            out.append(ModelUnderTest("cn-ft", name, net, tasks))
            if near := tuple(u for u in unseen if get_task(u).nearest in tasks):
                out.append(ModelUnderTest("cn-ft/nearest", name, net, near))
    return [replace(m, unet=(unets or {}).get(m.checkpoint)) for m in out]


def evaluation_prompts(prompts_path: Path, cfg: EvalConfig) -> list[dict]:
    """The materialised prompts; an unseen task keeps its first `cfg.unseen_per_task` (four conditions
    each: the cap keeps the added generations cheap)."""
    rows, seen = pq.read_table(prompts_path).to_pylist(), {}
    out = []
    for r in rows:
        seen[r["task"]] = seen.get(r["task"], 0) + 1
        if get_task(r["task"]).trained or seen[r["task"]] <= cfg.unseen_per_task:
            out.append(r)
    return out


def slug(name: str) -> str:
    return name.replace("->", "-to-").replace("/", "_")


def _save_pngs(folder: Path, arrays: np.ndarray, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for a, n in zip(arrays, names):
        p = folder / f"{n}.png"
        Image.fromarray(a if a.dtype == np.uint8 else np.asarray(a).round().clip(0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def _rmse_rows(model_id: str, spec: TaskSpec, outputs: np.ndarray, targets: np.ndarray, cfg: EvalConfig) -> list[MetricRow]:
    """RMSE (Table 1), then SSIM and PSNR as extra rows."""
    value = rmse(outputs, targets, cfg.bootstrap, cfg.seed)
    extra = map_similarity(outputs, targets, cfg.bootstrap, cfg.seed)
    return [metric_row(model_id, spec.name, "rmse", value, "", cfg)] + [metric_row(model_id, spec.name, k, v, "", cfg)
                                                                      for k, v in extra.items()]


def metric_row(model_id: str, task: str, metric: str, value: MetricValue, extractor: str, cfg: EvalConfig) -> MetricRow:
    """A metric of this evaluation; its eval_id is stamped when the evaluation is stored (`pd_eval.evaluate`)."""
    return MetricRow("", model_id, task, metric, value.value, value.ci_low, value.ci_high, value.n, extractor, cfg.protocol)


def _score(model_id: str, spec: TaskSpec, outputs: np.ndarray, targets: np.ndarray, names: list[str], out_dir: Path,
           extractor: tuple[str, object], cfg: EvalConfig) -> list[MetricRow]:
    """The task's metric rows for `outputs` (saved under samples/ first: FID reads folders): RMSE,
    SSIM, PSNR for image->map; FID and KID against the real targets for map->image."""
    _save_pngs(out_dir / "samples" / slug(model_id) / slug(spec.name), outputs, names)
    if spec.metric == "rmse":
        return _rmse_rows(model_id, spec, outputs, targets, cfg)
    real_dir = out_dir / "real" / slug(spec.name)
    if not real_dir.exists():
        _save_pngs(real_dir, targets, names)
    name, net = extractor
    value = fid(out_dir / "samples" / slug(model_id) / slug(spec.name), real_dir, net, cfg.bootstrap, cfg.seed)
    k = kid(outputs, targets, net, cfg.bootstrap, cfg.seed, cfg.kid_subsets, cfg.kid_subset_size)
    return [metric_row(model_id, spec.name, "fid", value, name, cfg), metric_row(model_id, spec.name, "kid", k, name, cfg)]


def run_benchmark(base: BaseModel, models: list[ModelUnderTest], data: SplitData, prompts_path: Path,
                  cfg: EvalConfig, out_dir: Path, train: SplitData | None = None) -> tuple[list[MetricRow], list[dict]]:
    """Generate, save PNGs and grids, compute metrics; returns (metric rows, sample rows).

    With `train` (the train split), every task is also scored for the trivial baselines of
    `pd_eval.baselines` (copy-example; copy-query and mean-map for image->map), on the same prompts."""
    extractor = load_extractor("inception" if cfg.protocol == "paper" else "auto")  # the paper's FID is Inception's
    prompts = evaluation_prompts(prompts_path, cfg)
    metric_rows, sample_rows = [], []
    for m in models:
        model_base = base.with_unet(m.unet)
        pair_guidance = cfg.pair_guidance_scale if kind_of(m.controlnet) == "prompt-diffusion" else None  # CN(FT) has no pair
        for task in m.tasks:
            spec = get_task(task)
            rows = [r for r in prompts if r["task"] == task]
            if not rows:
                continue
            built = [data.prompt(spec, r["example_id"], r["query_id"]) for r in rows]
            outs = []
            for i in tqdm(range(0, len(rows), cfg.batch_size), desc=f"{m.checkpoint} {task}", unit="batch"):
                chunk = slice(i, i + cfg.batch_size)
                outs.append(generate(model_base, m.controlnet, built[chunk], [r["seed"] for r in rows[chunk]],
                                     scheduler=cfg.scheduler, steps=cfg.steps, guidance_scale=cfg.guidance_for(spec),
                                     positive_suffix=cfg.positive_suffix, negative_prompt=cfg.negative_prompt,
                                     pair_guidance_scale=pair_guidance, empty_pair=m.empty_pair))
            outputs = np.concatenate(outs)
            targets = np.stack([p.target for p in built])
            names = [r["prompt_id"].split("/")[-1] for r in rows]
            (out_dir / "grids").mkdir(parents=True, exist_ok=True)
            prompt_grid(built[:6], outputs[:6]).save(out_dir / "grids" / f"{slug(m.model_id)}__{slug(task)}.png")
            metric_rows += _score(m.model_id, spec, outputs, targets, names, out_dir, extractor, cfg)
            gen_dir = out_dir / "samples" / slug(m.model_id) / slug(task)
            sample_rows += [{"model_id": m.model_id, "task": task, "prompt_id": r["prompt_id"], "path": str(gen_dir / f"{n}.png")}
                            for r, n in zip(rows, names)]
    if train is not None:
        metric_rows += baseline_rows(data, train, prompts, cfg, out_dir, extractor)
    return metric_rows, sample_rows


def baseline_rows(data: SplitData, train: SplitData, prompts: list[dict], cfg: EvalConfig, out_dir: Path,
                  extractor: tuple[str, object] | None = None) -> list[MetricRow]:
    """Every baseline of every task of the materialised prompts, scored as the models are (`_score`);
    their answers are saved under samples/ too."""
    extractor = extractor or load_extractor("inception" if cfg.protocol == "paper" else "auto")
    out = []
    for task in dict.fromkeys(r["task"] for r in prompts):
        spec = get_task(task)
        rows = [r for r in prompts if r["task"] == task]
        built = [data.prompt(spec, r["example_id"], r["query_id"]) for r in rows]
        targets = np.stack([p.target for p in built])
        names = [r["prompt_id"].split("/")[-1] for r in rows]
        for name in baselines_for(spec):
            out += _score(name, spec, baseline_outputs(name, spec, built, train), targets, names, out_dir, extractor, cfg)
    return out
