"""PromptDiffusionPipeline, editing and `pd generate` / `pd edit` on tiny real diffusers models."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import live_controlnet
from flows.cli import main as pd_main
from pd_model.base import build_tiny_base
from pd_model.config import BaseModelConfig
from pd_model.editing import edit_one_step, edit_two_steps
from pd_model.pipeline import PromptDiffusionPipeline
from pd_model.train import build_controlnet

CAPTIONS = ["a red ball on a plain grey background", "depth map", "a blue box on a sky background"]


@pytest.fixture(scope="module")
def parts():
    base = build_tiny_base(BaseModelConfig(), CAPTIONS, 32).freeze()
    return base, live_controlnet(build_controlnet(base, "prompt-diffusion")), live_controlnet(build_controlnet(base, "cn-ft"))


def _img(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _run(pipe, seed=0, **kw):
    args = dict(image_pair=(_img(1), _img(2)), image=_img(3), num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(seed))
    args.update(kw)
    return pipe("a red ball", **args)


def test_output_types_and_determinism(parts):
    base, pd, _ = parts
    pipe = PromptDiffusionPipeline.from_parts(base, pd, "ddim")
    a, b = _run(pipe), _run(pipe)
    assert a.shape == (1, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, _run(pipe, seed=1))
    pil = _run(pipe, output_type="pil")
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    pt = _run(pipe, output_type="pt")
    assert pt.shape == (1, 3, 32, 32) and pt.min() >= -1 and pt.max() <= 1


def test_guidance_scale_one_is_the_conditional_model_alone(parts):
    base, pd, _ = parts
    pipe = PromptDiffusionPipeline.from_parts(base, pd, "ddim")
    g1 = _run(pipe, guidance_scale=1.0, output_type="pt")
    g1_other_negative = _run(pipe, guidance_scale=1.0, negative_prompt="a blue box", output_type="pt")
    assert torch.equal(g1, g1_other_negative)  # no unconditional branch at all
    near = _run(pipe, guidance_scale=1.0 + 1e-6, negative_prompt="a blue box", output_type="pt")
    assert torch.allclose(g1, near, atol=1e-4)  # and the guided formula meets it continuously
    assert not torch.allclose(g1, _run(pipe, guidance_scale=5.0, output_type="pt"), atol=1e-3)


def test_the_example_pair_and_pair_guidance_change_the_output(parts):
    base, pd, _ = parts
    pipe = PromptDiffusionPipeline.from_parts(base, pd, "ddim")
    ref = _run(pipe, guidance_scale=3.0, output_type="pt")
    other_pair = _run(pipe, guidance_scale=3.0, image_pair=(_img(7), _img(8)), output_type="pt")
    with_pg = _run(pipe, guidance_scale=3.0, pair_guidance_scale=2.0, output_type="pt")
    assert not torch.allclose(ref, other_pair, atol=1e-4) and not torch.allclose(ref, with_pg, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "unipc"])
def test_any_scheduler_runs_and_batches_per_image_generators(parts, scheduler):
    base, pd, _ = parts
    pipe = PromptDiffusionPipeline.from_parts(base, pd, scheduler)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    out = pipe(["a red ball", "a blue box on a sky background"], image_pair=([_img(1), _img(4)], [_img(2), _img(5)]),
               image=[_img(3), _img(6)], num_inference_steps=3, guidance_scale=2.0, generator=gens, output_type="np")
    assert out.shape == (2, 32, 32, 3)


def test_stock_controlnet_baseline_and_input_errors(parts):
    base, pd, cn = parts
    baseline = PromptDiffusionPipeline.from_parts(base, cn, "ddim")
    assert _run(baseline, image_pair=None).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="image_pair needs a PromptDiffusionControlNet"):
        _run(baseline)
    with pytest.raises(ValueError, match="needs image_pair"):
        _run(PromptDiffusionPipeline.from_parts(base, pd), image_pair=None)
    with pytest.raises(ValueError, match="unknown scheduler"):
        PromptDiffusionPipeline.from_parts(base, pd).set_scheduler("euler-magic")


def test_one_and_two_step_editing_run(parts):
    base, pd, _ = parts
    pipe = PromptDiffusionPipeline.from_parts(base, pd, "ddim")
    kw = {"num_inference_steps": 2, "guidance_scale": 2.0, "generator": torch.Generator().manual_seed(0)}
    one = edit_one_step(pipe, _img(1), "a blue box on a sky background", (_img(2), _img(3)), **kw)
    predicted_map, two = edit_two_steps(pipe, _img(4), "a blue box on a sky background", "depth",
                                        (_img(5), _img(6)), (_img(7), _img(8)), **kw)
    assert one.size == two.size == predicted_map.size == (32, 32)


def test_pd_generate_and_edit_write_pngs(parts, tmp_path):
    base, pd, _ = parts
    base.save(tmp_path / "base")
    model = tmp_path / "model"
    pd.save_pretrained(model / "controlnet")
    (model / "pipeline.json").write_text(json.dumps({"base": str(tmp_path / "base"), "kind": "prompt_diffusion"}))
    for i in range(4):
        _img(i).save(tmp_path / f"{i}.png")
    p = lambda i: str(tmp_path / f"{i}.png")  # noqa: E731
    common = ["--model", str(model), "--steps", "2", "--guidance", "2"]
    assert pd_main(["generate", "--prompt", "a red ball", "--pair", p(0), p(1), "--query", p(2),
                    "--out", str(tmp_path / "gen.png"), *common]) == 0
    assert Image.open(tmp_path / "gen.png").size == (32, 32)
    assert pd_main(["edit", "--text", "a blue box", "--inverse-pair", p(0), p(1), "--image", p(2),
                    "--forward-pair", p(3), p(0), "--out", str(tmp_path / "edit.png"), *common]) == 0
    assert (tmp_path / "edit.png").exists() and (tmp_path / "edit-depth.png").exists()
    assert pd_main(["generate", "--prompt", "x", "--pair", p(0), "missing.png", "--query", p(2),
                    "--out", str(tmp_path / "no.png"), *common]) == 2
