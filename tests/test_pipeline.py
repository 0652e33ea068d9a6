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
from pd_model.pipeline import PromptDiffusionPipeline, save_trained, uint8_images
from pd_model.train import build_controlnet

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

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
    return pipe("a red ball", **args).images


def test_output_types_and_determinism(parts):
    """diffusers' conventions: `.images`, a tuple with return_dict=False, floats in [0, 1] for np and pt."""
    base, pd, _ = parts
    pipe = PromptDiffusionPipeline.from_parts(base, pd, "ddim")
    a, b = _run(pipe), _run(pipe)
    assert a.shape == (1, 32, 32, 3) and a.dtype == np.float32 and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and a.max() - a.min() > 0.1
    assert not np.array_equal(a, _run(pipe, seed=1))
    pil = _run(pipe, output_type="pil")
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    assert np.abs(uint8_images(pil) / 255.0 - a).max() <= 0.5 / 255 + 1e-6  # the same image, rounded to 8 bits
    pt = _run(pipe, output_type="pt")
    assert pt.shape == (1, 3, 32, 32) and pt.min() >= 0 and pt.max() <= 1
    assert torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(a))
    as_tuple = pipe("a red ball", image_pair=(_img(1), _img(2)), image=_img(3), num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and np.array_equal(as_tuple[0], a)
    latent = _run(pipe, output_type="latent")
    assert latent.shape == (1, 3, 32, 32) and latent.min() < 0  # the pixel-space base: x before the image mapping
    with pytest.raises(ValueError, match="output_type='uint8'"):
        _run(pipe, output_type="uint8")


def test_images_per_prompt_conditioning_scale_and_step_callback(parts):
    base, pd, _ = parts
    pipe = PromptDiffusionPipeline.from_parts(base, pd, "ddim")
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    two = _run(pipe, num_images_per_prompt=2, generator=gens)
    assert two.shape == (2, 32, 32, 3)
    # image i is prompt i // 2 with generator i (batch composition may move a float's last bits)
    assert np.allclose(two[:1], _run(pipe, seed=0), atol=1e-5) and np.allclose(two[1:], _run(pipe, seed=1), atol=1e-5)
    assert not np.allclose(two[:1], two[1:], atol=1e-3)
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        _run(pipe, num_images_per_prompt=3, generator=gens)
    ref = _run(pipe, guidance_scale=1.0)
    assert np.array_equal(ref, _run(pipe, guidance_scale=1.0, controlnet_conditioning_scale=1.0))
    no_control = _run(PromptDiffusionPipeline.from_parts(base, None, "ddim"), image_pair=None, image=None, guidance_scale=1.0,
                      height=32, width=32)
    assert np.allclose(_run(pipe, guidance_scale=1.0, controlnet_conditioning_scale=0.0), no_control, atol=1e-6)
    assert not np.allclose(ref, _run(pipe, guidance_scale=1.0, controlnet_conditioning_scale=0.5), atol=1e-4)
    seen = []

    def zero_latents(p, i, t, kw):
        seen.append((i, int(t), tuple(kw["latents"].shape)))
        return {"latents": torch.zeros_like(kw["latents"])}
    out = _run(pipe, output_type="latent", callback_on_step_end=zero_latents)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 3, 32, 32) and torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="cannot apply"):
        _run(pipe, callback_on_step_end=zero_latents, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_a_trained_model_folder_loads_with_from_pretrained(parts, tmp_path):
    """The train stage's folder is a diffusers pipeline folder: one line loads it, and it generates
    exactly what the in-memory parts do; the frozen components are hard links to the base's files."""
    base, pd, _ = parts
    base.save(tmp_path / "base")
    save_trained(tmp_path / "model", pd, base, str(tmp_path / "base"), "prompt-diffusion", ("image->depth",), False)
    pipe = PromptDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert type(pipe.controlnet).__name__ == "PromptDiffusionControlNet" and pipe.vae is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    ref = PromptDiffusionPipeline.from_parts(base, pd, "ddim")
    assert np.array_equal(_run(pipe), _run(ref))
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_nlink == 2 and weights.stat().st_ino == (tmp_path / "base" / weights.relative_to(tmp_path / "model")).stat().st_ino
    own = tmp_path / "own-unet"
    save_trained(own, pd, base, "no-such-base-folder", "prompt-diffusion", ("image->depth",), True)
    assert (own / "unet").is_dir() and (own / "text_encoder").is_dir()  # saved from memory: no folder to link
    assert np.array_equal(_run(PromptDiffusionPipeline.from_pretrained(own)), _run(ref))


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
               image=[_img(3), _img(6)], num_inference_steps=3, guidance_scale=2.0, generator=gens, output_type="np").images
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
