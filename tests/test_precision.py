"""Mixed precision and gradient checkpointing trade memory and speed, never what is learned."""
import math

import pytest

from pd_data.tasks import TRAINING_TASKS
from pd_model.base import load_base
from pd_model.config import TrainConfig
from pd_model.train import ModelSpec, train_controlnet

CFG = TrainConfig(steps=2, batch_size=2, learning_rate=1e-4, device="cpu")


def _train(world, data, **update):
    cfg = CFG.model_copy(update=update)
    net, losses = train_controlnet(load_base(world / "base"), data, cfg, ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, cfg.steps))
    return net.state_dict(), losses


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def world(train_world):
    return train_world


@pytest.fixture(scope="module")
def data(world):
    from pd_data.dataset import load_split

    return load_split(world / "img", world / "ann", "train")


def test_bf16_autocast_trains_on_cpu_with_a_finite_loss_near_fp32(world, data):
    fp32, fp32_losses = _train(world, data, mixed_precision="no")
    bf16, bf16_losses = _train(world, data, mixed_precision="bf16")
    assert all(math.isfinite(x) for x in bf16_losses)
    assert bf16_losses != fp32_losses  # autocast really ran in bf16 ...
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.05)  # ... and computed the same loss, roughly
    assert max_diff(fp32, bf16) < 1e-3


def test_gradient_checkpointing_learns_the_same_weights(world, data):
    plain, plain_losses = _train(world, data, gradient_checkpointing=False)
    ckpt, ckpt_losses = _train(world, data, gradient_checkpointing=True)
    assert ckpt_losses == pytest.approx(plain_losses, abs=1e-7)
    assert max_diff(plain, ckpt) < 1e-6


def test_min_snr_weighting_reweights_the_loss_and_a_huge_gamma_is_the_plain_loss(world, data):
    plain, plain_losses = _train(world, data, mixed_precision="no")
    huge, huge_losses = _train(world, data, mixed_precision="no", snr_gamma=1e12)  # min(snr, gamma) / snr == 1
    assert huge_losses == pytest.approx(plain_losses, rel=1e-6) and max_diff(plain, huge) < 1e-6
    _, snr_losses = _train(world, data, mixed_precision="no", snr_gamma=5.0)
    assert snr_losses[0] != pytest.approx(plain_losses[0], rel=1e-3)  # same batch, reweighted


def test_base_training_calls_its_hook_on_schedule_with_the_weights_it_ships(world, data):
    """train_base's every=(n, f): f(step) at every n-th step and the last, with the EMA weights in place."""
    import torch

    from pd_model.config import BaseModelConfig
    from pd_model.train_base import train_base

    base = load_base(world / "base")
    seen: dict[int, torch.Tensor] = {}
    first = next(base.unet.parameters())
    cfg = BaseModelConfig(train_steps=5, batch_size=2, ema_decay=0.9)
    train_base(base, data, cfg, every=(2, lambda step: seen.__setitem__(step, first.detach().clone())))
    assert sorted(seen) == [2, 4, 5]
    assert torch.equal(seen[5], first.detach())  # the last call saw what training leaves: the EMA
    assert not torch.equal(seen[2], seen[4])
