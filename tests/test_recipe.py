"""Settings of the training recipe beyond the paper's: the pair-context path, cubic timesteps, and what training samples carry."""
import numpy as np
import pytest
import torch

from conftest import TINY, live_controlnet
from flows.plan import Plan
from flows.profiles import ConfigError, load_profile
from pd_data.dataset import load_split
from pd_core.state import StateDir
from pd_data.tasks import TRAINING_TASKS, get_task
from pd_model.base import build_tiny_base
from pd_model.config import BaseModelConfig, TrainConfig
from pd_model.controlnet import PromptDiffusionControlNet
from pd_model.objective import cfg_dropout, draw_noise
from pd_model.train import PromptSamples, build_controlnet
from pd_eval.report import recipe_line

pytestmark = pytest.mark.numerics

CAPTIONS = ["a red ball on a plain grey background", "a blue box and a green ring on a sky background"]


@pytest.fixture(scope="module")
def base():
    return build_tiny_base(BaseModelConfig(), CAPTIONS, 32).freeze()


@pytest.mark.parametrize("setting", [{"pair_context": True}, {"timesteps": "cubic"}])
def test_a_recipe_setting_changes_the_train_key_and_the_paper_profile_refuses_it(setting, tmp_path):
    plain = Plan.build(load_profile("smoke", TINY), StateDir(tmp_path))
    other = Plan.build(load_profile("smoke", {**TINY, "train": {**TINY["train"], **setting}}), StateDir(tmp_path))
    assert other.key("train") != plain.key("train") and other.key("base") == plain.key("base")
    (name, value), = setting.items()
    with pytest.raises(ConfigError, match=f"train.{name}=.*not in the paper's recipe"):
        load_profile("paper", {"train": setting})
    assert f"{name}={value}" in recipe_line(other.profile.train)
    assert recipe_line(TrainConfig()) == "recipe: the paper's"


def test_the_pair_context_starts_silent_reaches_every_block_and_survives_a_round_trip(base, tmp_path):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 900])
    pair, query = torch.randn(2, 6, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    emb = base.encode_text(CAPTIONS)
    net = live_controlnet(build_controlnet(base, "prompt-diffusion", pair_context=True))
    ctx = net.controlnet_pair_context
    with torch.no_grad():
        ctx.proj.weight.zero_(), ctx.proj.bias.zero_()
        silent = net(x, t, emb, controlnet_cond=pair, controlnet_query_cond=query).mid_block_res_sample
        ctx.proj.weight.normal_(0, 0.5, generator=g)
        # The mid block sees only what the pair's first-map injection carries down, unless the context reaches it.
        on = net(x, t, emb, controlnet_cond=pair, controlnet_query_cond=query).mid_block_res_sample
        other = net(x, t, emb, controlnet_cond=pair.flip(0), controlnet_query_cond=query).mid_block_res_sample
    assert not torch.allclose(silent, on) and not torch.allclose(on, other)
    net.save_pretrained(tmp_path)
    back = PromptDiffusionControlNet.from_pretrained(tmp_path)
    assert back.config.pair_context
    with torch.no_grad():
        again = back(x, t, emb, controlnet_cond=pair, controlnet_query_cond=query).mid_block_res_sample
    torch.testing.assert_close(again, on)
    assert not hasattr(build_controlnet(base, "prompt-diffusion"), "controlnet_pair_context")
    assert not hasattr(build_controlnet(base, "cn-ft", pair_context=True), "controlnet_pair_context")  # no pair there


def test_cubic_timesteps_put_most_draws_at_high_noise_and_uniform_ones_are_unchanged():
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4000)]  # noqa: E731
    _, cubic = draw_noise(gens(), (1,), 1000, "cubic")
    _, uniform = draw_noise(gens(), (1,), 1000)
    assert cubic.min() >= 0 and cubic.max() <= 999 and 0.77 < (cubic >= 500).float().mean() < 0.82  # P(u^3 <= 0.5) = 0.794
    assert 0.45 < (uniform >= 500).float().mean() < 0.55
    g = torch.Generator().manual_seed(7)
    torch.randn((1,), generator=g)
    assert draw_noise([torch.Generator().manual_seed(7)], (1,), 1000)[1][0] == torch.randint(0, 1000, (), generator=g)
    with pytest.raises(ValueError, match="unknown timestep sampling 'log'"):
        draw_noise(gens()[:1], (1,), 1000, "log")


def test_mixed_timesteps_are_half_cubic_half_uniform_and_each_sample_its_own():
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4000)]  # noqa: E731
    _, mixed = draw_noise(gens(), (1,), 1000, "mixed")
    assert mixed.min() >= 0 and mixed.max() <= 999
    assert 0.62 < (mixed >= 500).float().mean() < 0.675  # 0.5 * 0.794 + 0.5 * 0.5 = 0.647
    assert 0.055 < (mixed < 100).float().mean() < 0.08  # 0.5 * 0.035 + 0.5 * 0.1: the low-noise steps keep a share
    one = draw_noise(gens()[5:6], (1,), 1000, "mixed")[1]
    assert one[0] == mixed[5]  # a sample's timestep depends on its own generator only, not on the batch


def test_training_samples_carry_their_task_in_the_pair(train_world):
    """The example target is the example image's map of the task's target modality, the target the
    query's of the same modality, and the dropout leaves the pair alone where it keeps it."""
    data = load_split(train_world / "img", train_world / "ann", "train")
    by_modality: dict[str, dict[bytes, set[str]]] = {}  # a picture and its edited twin share their maps
    for m in ("image", *data.modalities):
        for i in data.arrays:
            by_modality.setdefault(m, {}).setdefault(data.arrays[i][m].tobytes(), set()).add(i)
    specs = [get_task(t) for t in TRAINING_TASKS]
    samples = PromptSamples(data, specs, (0, 0))
    seen = set()
    for i in range(60):
        s = samples[(0, i)]
        spec, = [sp for sp in specs if s["example_target"].tobytes() in by_modality[sp.target]
                 and s["query"].tobytes() in by_modality[sp.source]]
        seen.add(spec.name)
        ex = by_modality[spec.target][s["example_target"].tobytes()] & by_modality[spec.source][s["example_source"].tobytes()]
        q = by_modality[spec.target][s["target"].tobytes()] & by_modality[spec.source][s["query"].tobytes()]
        assert ex and q and not ex & q  # each pair from one image, example and query from different ones
        if spec.target != "image":  # an image->map pair's target is that map and no other modality's
            assert all(s["example_target"].tobytes() not in by_modality[m] for m in data.modalities if m != spec.target)
    assert seen == set(TRAINING_TASKS)
    u = np.random.default_rng(0).random(100_000)
    cfg = TrainConfig(drop_text=0.5)
    drop_text, drop_pair = cfg_dropout(u, cfg)
    assert abs((drop_text & ~drop_pair).mean() - 0.5) < 0.01 and abs((drop_pair & ~drop_text).mean() - 0.05) < 0.01
    assert abs((drop_pair & drop_text).mean() - 0.05) < 0.01 and abs((~drop_pair).mean() - 0.9) < 0.01


def test_continuing_a_model_under_another_pair_context_is_an_error(train_world, tmp_path):
    from pd_model.base import load_base
    from pd_model.train import ModelSpec, train_controlnet

    base = load_base(train_world / "base")
    build_controlnet(base, "prompt-diffusion").save_pretrained(tmp_path / "cn")
    data = load_split(train_world / "img", train_world / "ann", "train")
    spec = ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, 1)
    with pytest.raises(ValueError, match=r"train.pair_context=True cannot apply when continuing from .* pair_context=False"):
        train_controlnet(base, data, TrainConfig(steps=1, batch_size=2, pair_context=True), spec, init=tmp_path / "cn")
