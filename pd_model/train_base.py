"""Text-to-image training of the tiny base, resumable like every other training (`pd_model.loop`).

`train_base_folder` is the base stage and the retrain flow's base: build, train, save, sample."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pd_data.dataset import SplitData
from pd_data.tasks import TRAINING_TASKS, get_task
from pd_model.base import BaseModel, build_tiny_base
from pd_model.config import BaseModelConfig
from pd_model.hints import to_unit
from pd_model.loop import Checkpointing, Optim, run
from pd_model.objective import Batch, TextCache, prediction_loss
from pd_model.precision import fast_layout, resolve
from pd_model.config import Sampler
from pd_model.tracking import LOGS, ReportTo, Tracking


def train_base(base: BaseModel, data: SplitData, cfg: BaseModelConfig, every: tuple[int, Callable[[int], None]] | None = None,
               checkpoint_dir: Path | None = None, track: Tracking | None = None) -> list[float]:
    """Text-to-image training of the tiny base on the ingested images and captions. `every=(n, f)`
    calls f(step) every n steps and at the last, EMA weights in place (scripts/bench_base.py scores
    samples along one run that way). With `checkpoint_dir` and `cfg.checkpoint_every`, the UNet (and
    the text encoder when it is trained) is checkpointed there, and a killed run resumes from it.
    `track`: the tracker the loop logs each step to."""
    ids = sorted(data.captions)
    text_cache = TextCache(base)
    base.unet.train()
    base.text_encoder.requires_grad_(False)

    # (modality, text) of the trained forward tasks: "depth map", ... (see BaseModelConfig.map_fraction)
    have = set(data.modalities)
    maps = [(get_task(t).target, get_task(t).fixed_text) for t in TRAINING_TASKS
            if get_task(t).source == "image" and get_task(t).target in have]

    def step_loss(step: int, idx: range) -> torch.Tensor:
        # The whole global batch is drawn (as before slicing existed), then this micro-batch's slice taken.
        rng = np.random.default_rng([cfg.seed, step])
        pick = [ids[i] for i in rng.integers(len(ids), size=cfg.batch_size)]
        # 10% empty captions, so that classifier-free guidance has an unconditional model to use.
        texts = ["" if u < 0.1 else data.captions[i] for i, u in zip(pick, rng.random(len(pick)))]
        arrays = [data.arrays[i]["image"] for i in pick]
        if cfg.map_fraction > 0 and maps:  # drawn after the draws above, so map_fraction=0 keeps the batches as they were
            for k, (u, m) in enumerate(zip(rng.random(len(pick)), rng.integers(len(maps), size=len(pick)))):
                if u < cfg.map_fraction:
                    modality, text = maps[int(m)]
                    arrays[k], texts[k] = data.arrays[pick[k]][modality], ("" if texts[k] == "" else text)
        x = to_unit(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)) * 2 - 1
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, base.scheduler.config.num_train_timesteps, (x.shape[0],), generator=gen)
        s = slice(idx.start, idx.stop)
        texts = texts[s]
        return prediction_loss(base, x[s], noise[s], t[s], encode(texts), Batch(x[s], texts), snr_gamma=cfg.snr_gamma)

    params = list(base.unet.parameters())
    if cfg.train_text_encoder:  # learnt with the UNet: a random frozen encoder mixes the words of a caption
        base.text_encoder.requires_grad_(True).train()
        params += list(base.text_encoder.parameters())

    def encode(texts: list[str]) -> torch.Tensor:
        if not cfg.train_text_encoder:
            return text_cache(texts)
        tok = base.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=base.tokenizer.model_max_length, return_tensors="pt")
        return base.text_encoder(tok.input_ids)[0]

    trained = {"unet": base.unet} | ({"text_encoder": base.text_encoder} if cfg.train_text_encoder else {})
    ckpt = Checkpointing(checkpoint_dir, trained, cfg.checkpoint_every, cfg.keep_last) \
        if checkpoint_dir is not None and cfg.checkpoint_every else None
    precision = resolve(cfg.mixed_precision, base.unet.device, "base.mixed_precision")
    with fast_layout([base.unet], precision, base.unet.device):
        losses = run(params, Optim.of(cfg, cfg.train_steps, precision), step_loss, "base", ckpt, every, track)
    base.unet.eval()
    base.text_encoder.requires_grad_(False).eval()
    return losses




def train_base_folder(cfg: BaseModelConfig, data: SplitData, resolution: int, out: Path,
                      report_to: ReportTo = "tensorboard") -> dict:
    """Build the tiny base on `data`'s captions, train it (checkpoints under `out/checkpoints`, the
    `report_to` tracker's run under `out/logs`), and save it and its losses in `out`; returns the
    stage summary."""
    from pd_model.checkpoint import save_losses

    base = build_tiny_base(cfg, sorted(set(data.captions.values())), resolution)
    track = Tracking(report_to, out / LOGS, "base", {"base": cfg.model_dump(), "resolved": {"resolution": resolution}})
    losses = train_base(base, data, cfg, checkpoint_dir=out / "checkpoints", track=track)
    base.save(out)
    save_losses(out / "losses.json", losses)
    return {"path": str(out), "steps": cfg.train_steps, "final_loss": losses[-1] if losses else None}


def base_samples(base: BaseModel, held_out: SplitData, path: Path, sampler: Sampler, resolution: int, n: int = 8) -> None:
    """Text -> image samples of the base from held-out captions: does it draw the scenes it is told?
    Each sample sits beside the held-out image of its caption, the picture it should resemble.
    `sampler`'s text settings apply (a base has no pair)."""
    from pd_model.pipeline import PromptDiffusionPipeline, uint8_images
    from pd_model.visuals import caption_grid

    ids = sorted(held_out.captions)[:n]
    captions = [held_out.captions[i] for i in ids]
    pipe = PromptDiffusionPipeline.from_parts(base, None, sampler.scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = uint8_images(pipe([c + sampler.positive_suffix for c in captions], num_inference_steps=sampler.steps,
                               guidance_scale=sampler.guidance_scale, negative_prompt=sampler.negative_prompt,
                               height=resolution, width=resolution,
                               generator=[torch.Generator().manual_seed(i) for i in range(len(captions))]).images)
    real = np.stack([held_out.arrays[i]["image"] for i in ids])
    pairs = np.stack([x for ab in zip(images, real) for x in ab])
    labels = [x for c in captions for x in (f"generated: {c}", "held-out image")]
    caption_grid(pairs, labels).save(path)
