import numpy as np
import pytest
import torch

from conftest import live_controlnet
from pd_data.tasks import Prompt
from pd_model.base import build_tiny_base, load_base
from pd_model.config import BaseModelConfig, TrainConfig
from pd_model.controlnet import PromptDiffusionControlNet
from pd_model.config import Sampler
from pd_model.sampling import generate
from pd_model.train import build_controlnet, cfg_dropout

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

CAPTIONS = ["a red ball on a plain grey background", "a blue box and a green ring on a sky background"]


@pytest.fixture(scope="module")
def base():
    return build_tiny_base(BaseModelConfig(), CAPTIONS, 32).freeze()


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 32, 32, generator=g), torch.tensor([10, 500]), torch.randn(b, 6, 32, 32, generator=g),
            torch.randn(b, 3, 32, 32, generator=g))


def test_fresh_controlnet_leaves_the_base_prediction_unchanged(base):
    x, t, pair, query = _inputs()
    emb = base.encode_text(CAPTIONS)
    net = build_controlnet(base, "prompt-diffusion")
    with torch.no_grad():
        down, mid = net(x, t, emb, controlnet_cond=pair, controlnet_query_cond=query, return_dict=False)
        plain = base.unet(x, t, emb).sample
        with_cn = base.unet(x, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert torch.equal(plain, with_cn)


def test_both_hint_encoders_drive_the_output(base):
    """Pair and query each reach the residuals once the zero convolutions are non-zero."""
    x, t, pair, query = _inputs()
    emb = base.encode_text(CAPTIONS)
    net = live_controlnet(build_controlnet(base, "prompt-diffusion"))
    with torch.no_grad():
        ref = net(x, t, emb, controlnet_cond=pair, controlnet_query_cond=query).mid_block_res_sample
        no_pair = net(x, t, emb, controlnet_cond=torch.zeros_like(pair), controlnet_query_cond=query).mid_block_res_sample
        no_query = net(x, t, emb, controlnet_cond=pair, controlnet_query_cond=torch.zeros_like(query)).mid_block_res_sample
    assert not torch.allclose(ref, no_pair) and not torch.allclose(ref, no_query)


def test_save_load_round_trip_is_exact_and_in_safetensors(base, tmp_path):
    net = build_controlnet(base, "prompt-diffusion")
    net.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    back = PromptDiffusionControlNet.from_pretrained(tmp_path)
    assert back.config.hint_range == "-1,1" and back.config.conditioning_channels == 6
    a, b = net.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("controlnet_query_cond_embedding.") for k in a)  # the research port's layout


def test_base_round_trip_and_missing_folder_error(base, tmp_path):
    base.save(tmp_path / "base")
    back = load_base(tmp_path / "base")
    assert back.tokenizer("a red ball").input_ids == base.tokenizer("a red ball").input_ids
    with pytest.raises(FileNotFoundError, match="diffusers Stable Diffusion 1.5 folder"):
        load_base(tmp_path / "nowhere")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_base(tmp_path / "half")


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    return [Prompt("depth->image", arr(), arr(), arr(), arr(), CAPTIONS[i % 2]) for i in range(n)]


def test_sampling_is_deterministic_and_independent_of_the_batch(base):
    net = build_controlnet(base, "prompt-diffusion")
    ps = _prompts(3)
    a = generate(base, net, ps, [1, 2, 3], Sampler(steps=3, guidance_scale=3.0))
    b = generate(base, net, ps[1:2], [2], Sampler(steps=3, guidance_scale=3.0))
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    # Same seed, same prompt, other batch: equal up to float rounding of batched kernels (a level or two).
    diff = np.abs(a[1].astype(int) - b[0].astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.05
    again = generate(base, net, ps, [1, 2, 3], Sampler(steps=3, guidance_scale=3.0))
    assert np.array_equal(a, again)  # bitwise deterministic for a fixed batch
    c = generate(base, net, ps, [4, 5, 6], Sampler(steps=3, guidance_scale=3.0))
    assert not np.array_equal(a, c)


def test_dropout_rates_follow_the_paper():
    u = np.random.default_rng(0).random(200_000)
    drop_text, drop_pair = cfg_dropout(u, TrainConfig())
    assert abs((drop_text & ~drop_pair).mean() - 0.05) < 0.003
    assert abs((drop_text & drop_pair).mean() - 0.05) < 0.003
    assert abs((~drop_text & drop_pair).mean() - 0.05) < 0.003


@pytest.mark.parametrize("hint_range", ["0,1", "-1,1"])
def test_loads_the_research_ports_saved_layout(base, tmp_path, hint_range):
    import json

    net = build_controlnet(base, "prompt-diffusion")
    net.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["_class_name"] = "PromptDiffusionControlNetModel"  # as the port writes it, without our two keys
    del cfg["hint_range"], cfg["query_conditioning_channels"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    port = PromptDiffusionControlNet.from_research_port(tmp_path, hint_range=hint_range)
    assert port.config.hint_range == hint_range
    a, b = net.state_dict(), port.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_loss_targets_what_the_scheduler_predicts_and_survives_a_round_trip(kind, tmp_path):
    from pd_model.objective import Batch, prediction_loss

    b = build_tiny_base(BaseModelConfig(prediction_type=kind), CAPTIONS, 32).freeze()
    b.save(tmp_path / "base")
    assert load_base(tmp_path / "base").scheduler.config.prediction_type == kind
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 3, 32, 32, generator=g), torch.tensor([50, 900])
    emb = b.text_encoder(b.tokenizer(CAPTIONS, padding="max_length", max_length=24, return_tensors="pt").input_ids)[0]
    with torch.no_grad():
        loss = prediction_loss(b, x0, noise, t, emb, Batch(x0, CAPTIONS))
        pred = b.unet(b.scheduler.add_noise(x0, noise, t), t, emb).sample
    ab = b.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = noise if kind == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-5)
    image = generate(b, None, [Prompt("depth->image", *(np.zeros((32, 32, 3), np.uint8),) * 4, "a red ball")], [0], Sampler(steps=2))
    assert image.shape == (1, 32, 32, 3)


def test_the_tiny_base_tells_every_task_text_apart(base):
    """Its word-level vocabulary is built from the captions *and* the tasks' fixed texts: captions alone
    made "depth map", "hed map", "segmentation map" and "canny map" the same unknown tokens."""
    from pd_data.tasks import TASKS

    tok = base.tokenizer
    texts = sorted({t.fixed_text for t in TASKS.values() if t.fixed_text})
    ids = [tuple(tok(t).input_ids) for t in texts]
    assert len(texts) == 4 and len(set(ids)) == len(texts)
    assert all(tok.unk_token_id not in i for i in ids)
