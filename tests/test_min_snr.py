"""min-SNR-gamma weighting through diffusers' `compute_snr` is the hand-written formula it replaced."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from pd_model.base import BaseModel
from pd_model.objective import Batch, prediction_loss

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

SCHEDULES = {"tiny-base": {"beta_schedule": "squaredcos_cap_v2", "clip_sample": True},  # as build_tiny_base
             "sd15": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}}


def _base(kind: str, schedule: str) -> BaseModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=8).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind, **SCHEDULES[schedule])
    return BaseModel(unet, None, None, scheduler)


def _old_min_snr_loss(base: BaseModel, x0, noise, t, emb, gamma: float) -> torch.Tensor:
    """The formula before `compute_snr`: SNR = ab / (1 - ab); weight min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v."""
    pred = base.unet(base.scheduler.add_noise(x0, noise, t), t, emb).sample
    v = base.scheduler.config.prediction_type == "v_prediction"
    target = base.scheduler.get_velocity(x0, noise, t) if v else noise
    ab = base.scheduler.alphas_cumprod[t]
    snr = ab / (1 - ab)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    return (per_sample * torch.clamp(snr, max=gamma) / (snr + 1 if v else snr)).mean()


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_the_hand_written_formula_and_gamma_zero_the_plain_loss(kind, schedule):
    base = _base(kind, schedule)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1, torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0, 20, 300, 700, 999])  # SNR from far above gamma (clamped) to far below it
    emb = torch.randn(5, 4, 8, generator=g)  # (B, T, D)
    snr = base.scheduler.alphas_cumprod[t] / (1 - base.scheduler.alphas_cumprod[t])
    assert snr.max() > 5.0 > snr.min()
    with torch.no_grad():
        new = prediction_loss(base, x0, noise, t, emb, Batch(x0, [""] * 5), snr_gamma=5.0)
        old = _old_min_snr_loss(base, x0, noise, t, emb, 5.0)
        plain = prediction_loss(base, x0, noise, t, emb, Batch(x0, [""] * 5), snr_gamma=0.0)
        pred = base.unet(base.scheduler.add_noise(x0, noise, t), t, emb).sample
    assert new.item() == pytest.approx(old.item(), rel=1e-6)  # float rounding of sqrt-then-square only
    assert new.item() != pytest.approx(plain.item(), rel=1e-3)  # the weighting does something
    target = base.scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else noise
    assert plain.item() == F.mse_loss(pred, target).item()
