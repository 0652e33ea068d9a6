"""Mixed precision and gradient checkpointing trade memory and speed, never what is learned."""
import math

import pytest

from pd_data.tasks import TRAINING_TASKS
from pd_model.base import load_base
from pd_model.config import TrainConfig
from pd_model.train import ModelSpec, train_controlnet

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

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


def _windows(losses: list[float], n: int) -> list[float]:
    return [sum(losses[i:i + n]) / n for i in range(0, len(losses), n)]


def test_the_bf16_fast_path_trains_to_the_fp32_loss_curve(world, data):
    """40 steps, demo-shaped (decoder trained, min-SNR): bf16 autocast with channels_last weights and fp32
    attention follows fp32's loss curve window by window, while both learn."""
    kw = {"steps": 40, "batch_size": 8, "learning_rate": 1e-3, "snr_gamma": 5.0, "train_unet_decoder": True}
    fp32, fp32_losses = _train(world, data, mixed_precision="no", **kw)
    bf16, bf16_losses = _train(world, data, mixed_precision="bf16", **kw)
    other_seed = _train(world, data, mixed_precision="no", seed=1, **kw)[1]
    a, b, c = _windows(fp32_losses, 10), _windows(bf16_losses, 10), _windows(other_seed, 10)
    assert a[-1] < 0.8 * a[0] and b[-1] < 0.8 * b[0]  # both learn
    assert b == pytest.approx(a, rel=0.05)
    # bf16 is nearer fp32 than another seed's fp32 run is: its rounding is smaller than training noise.
    assert sum(abs(x - y) for x, y in zip(a, b)) < sum(abs(x - y) for x, y in zip(a, c))


def test_the_fast_layout_is_undone_after_training(world, data):
    """channels_last and the fp32-attention processors last only as long as the training: the returned
    ControlNet is contiguous and keeps the processors it had, so it saves and samples as any other."""
    from pd_model.precision import fast_layout

    base = load_base(world / "base")
    before = {k: type(p) for k, p in base.unet.attn_processors.items()}
    conv = next(m for m in base.unet.modules() if isinstance(m, __import__("torch").nn.Conv2d))
    with fast_layout([base.unet], "bf16", __import__("torch").device("cpu")):
        assert conv.weight.is_contiguous(memory_format=__import__("torch").channels_last) and not conv.weight.is_contiguous()
        assert {type(p).__name__ for p in base.unet.attn_processors.values()} == {"Fp32Attention"}
    assert conv.weight.is_contiguous() and {k: type(p) for k, p in base.unet.attn_processors.items()} == before
    net = train_controlnet(base, data, CFG.model_copy(update={"mixed_precision": "bf16"}),
                           ModelSpec("pd", "prompt-diffusion", TRAINING_TASKS, 2))[0]
    assert all(p.is_contiguous() for p in net.parameters()) and all(p.is_contiguous() for p in base.unet.parameters())
    assert {type(p).__name__ for p in net.attn_processors.values()} == {"AttnProcessor2_0"}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="fp16 (accelerate's autocast and scaler) needs CUDA")
def test_fp16_trains_with_a_gradient_scaler_near_fp32(world, data):
    """fp16 (for GPUs without bf16) scales the loss before backward and unscales before clipping: the
    step is fp32's, roughly; fp32 weights stay fp32."""
    import torch

    fp32, fp32_losses = _train(world, data, mixed_precision="no", device="cuda")
    fp16, fp16_losses = _train(world, data, mixed_precision="fp16", device="cuda")
    assert fp16_losses != fp32_losses and fp16_losses == pytest.approx(fp32_losses, rel=0.05)
    assert max_diff(fp32, fp16) < 1e-3 and all(v.dtype == torch.float32 for v in fp16.values())


def test_settings_that_cannot_apply_are_errors():
    import torch

    from pd_model.precision import resolve

    assert resolve("auto", torch.device("cpu")) == "no"  # a CPU run's weights do not depend on its CPU
    assert resolve("bf16", torch.device("cpu")) == "bf16"
    assert resolve("no", torch.device("cpu")) == "no"
    # accelerate would run "fp16" on the CPU as fp32 (no autocast, no scaler): refused, naming what works
    with pytest.raises(ValueError, match=r"base.mixed_precision='fp16' needs a CUDA device .* set base.mixed_precision=bf16"):
        resolve("fp16", torch.device("cpu"), "base.mixed_precision")
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
