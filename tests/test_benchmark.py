"""The benchmark's generation honours the evaluation config: pair guidance and map guidance reach the pipeline."""
import numpy as np
from PIL import Image

from conftest import live_controlnet
from pd_data.config import PromptConfig
from pd_data.dataset import load_split
from pd_data.prompts import materialise_prompts
from pd_data.tasks import get_task
from pd_eval.benchmark import ModelUnderTest, evaluation_prompts, run_benchmark
from pd_eval.config import EvalConfig
from pd_model.base import load_base
from pd_model.sampling import generate
from pd_model.train import build_controlnet


def test_the_benchmark_samples_with_the_configured_pair_guidance(train_world, tmp_path):
    data = load_split(train_world / "img", train_world / "ann", "train")
    base = load_base(train_world / "base").freeze()
    net = live_controlnet(build_controlnet(base, "prompt-diffusion"))  # so that the example pair changes the output
    task = "image->depth"
    prompts_path = tmp_path / "prompts.parquet"
    materialise_prompts(data, (task,), PromptConfig(per_task=2, split="train"), prompts_path)
    model = ModelUnderTest("prompt-diffusion", "prompt-diffusion", net, (task,))

    def saved(pair_guidance: float | None) -> tuple[EvalConfig, np.ndarray]:
        cfg = EvalConfig(steps=2, bootstrap=0, pair_guidance_scale=pair_guidance)
        out = tmp_path / f"pg-{pair_guidance}"
        _, samples = run_benchmark(base, [model], data, prompts_path, cfg, out)
        return cfg, np.stack([np.asarray(Image.open(s["path"])) for s in samples])

    cfg, with_pair = saved(3.0)
    _, text_only = saved(None)
    rows = evaluation_prompts(prompts_path, cfg)
    built = [data.prompt(get_task(task), r["example_id"], r["query_id"]) for r in rows]
    direct = generate(base, net, built, [r["seed"] for r in rows], steps=2, guidance_scale=cfg.guidance_scale,
                      pair_guidance_scale=3.0)
    assert np.array_equal(with_pair, direct)
    assert not np.array_equal(with_pair, text_only)


def test_map_guidance_applies_to_image_to_map_tasks_only(train_world, tmp_path):
    import pytest

    data = load_split(train_world / "img", train_world / "ann", "train")
    base = load_base(train_world / "base").freeze()
    net = live_controlnet(build_controlnet(base, "prompt-diffusion"))
    tasks = ("image->depth", "depth->image")
    prompts_path = tmp_path / "prompts.parquet"
    materialise_prompts(data, tasks, PromptConfig(per_task=2, split="train"), prompts_path)
    model = ModelUnderTest("prompt-diffusion", "prompt-diffusion", net, tasks)
    cfg = EvalConfig(steps=2, bootstrap=0, guidance_scale=3.0, map_guidance_scale=1.0)
    _, samples = run_benchmark(base, [model], data, prompts_path, cfg, tmp_path / "out")
    rows = evaluation_prompts(prompts_path, cfg)
    for task, guidance in (("image->depth", 1.0), ("depth->image", 3.0)):
        mine = [r for r in rows if r["task"] == task]
        built = [data.prompt(get_task(task), r["example_id"], r["query_id"]) for r in mine]
        direct = generate(base, net, built, [r["seed"] for r in mine], steps=2, guidance_scale=guidance)
        saved = np.stack([np.asarray(Image.open(s["path"])) for s in samples if s["task"] == task])
        assert np.array_equal(saved, direct), task
    with pytest.raises(ValueError, match="map_guidance_scale=1.0 cannot apply under eval.protocol='paper'"):
        EvalConfig(protocol="paper", map_guidance_scale=1.0)
