"""The loop on accelerate: an fp32 step is bitwise the step the project took before it (plain AdamW,
clipping, warm-up and EMA by hand), and accelerate's launcher settings never change what is learned."""
import pytest
import torch
from diffusers.training_utils import EMAModel

from pd_model.loop import Optim, run, warmup_schedule

O = Optim(steps=5, batch_size=4, lr=3e-2, weight_decay=1e-2, grad_clip=0.05, warmup_steps=2, ema_decay=0.9,
          grad_accum_steps=2)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 2))


def _step_loss(net):
    """The mean loss of samples `idx` of `step`, each drawn from its own (step, i) generator."""
    def step_loss(step: int, idx: range) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(1000 * step + i) for i in idx]
        x = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
        y = torch.stack([torch.randn(2, generator=g) for g in gens])
        return torch.nn.functional.mse_loss(net(x), y)
    return step_loss


def _before_accelerate(net, bf16: bool = False) -> list[float]:
    """The step as the loop computed it before accelerate: each micro-batch's share of the
    global-batch mean backpropagated (under torch.autocast in bf16), clipped, AdamW (the default
    kernel in fp32, the fused one in bf16), warm-up, EMA."""
    params = list(net.parameters())
    step_loss = _step_loss(net)
    opt = torch.optim.AdamW(params, lr=O.lr, weight_decay=O.weight_decay, fused=bf16 or None)
    sched = warmup_schedule(opt, O.warmup_steps)
    ema = EMAModel(params, decay=O.ema_decay)
    losses = []
    for step in range(O.steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for idx in (range(0, 2), range(2, 4)):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                part = step_loss(step, idx) * (len(idx) / O.batch_size)
            part.backward()
            loss = loss + part.detach().float().cpu()
        torch.nn.utils.clip_grad_norm_(params, O.grad_clip)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)
    return losses


def test_an_fp32_step_is_bitwise_the_step_before_accelerate():
    old, new = _net(), _net()
    old_losses = _before_accelerate(old)
    new_losses = run(list(new.parameters()), O, _step_loss(new), "toy")
    assert new_losses == old_losses
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    assert not torch.equal(_net().state_dict()["0.weight"], new.state_dict()["0.weight"])  # it did train


def test_a_bf16_step_is_bitwise_the_step_before_accelerate():
    """The demo trains in bf16: accelerate's autocast and optimizer wrapper compute what
    torch.autocast and the fused AdamW computed, so its numbers stay those of earlier runs."""
    from dataclasses import replace

    old, new = _net(), _net()
    old_losses = _before_accelerate(old, bf16=True)
    new_losses = run(list(new.parameters()), replace(O, mixed_precision="bf16"), _step_loss(new), "toy")
    assert new_losses == old_losses
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    fp32 = _net()
    run(list(fp32.parameters()), O, _step_loss(fp32), "toy")
    assert not torch.equal(fp32.state_dict()["0.weight"], new.state_dict()["0.weight"])  # bf16 really ran


def test_what_accelerate_launch_exports_changes_nothing_learned(monkeypatch):
    """`accelerate config` / `accelerate launch` export gradient accumulation, dynamo and a mixed
    precision; the job's own settings win, so the weights are the same."""
    plain = _net()
    plain_losses = run(list(plain.parameters()), O, _step_loss(plain), "toy")
    for var, value in {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
                       "ACCELERATE_MIXED_PRECISION": "bf16"}.items():
        monkeypatch.setenv(var, value)
    launched = _net()
    with pytest.warns(UserWarning, match="mixed_precision='bf16' is not used"):
        launched_losses = run(list(launched.parameters()), O, _step_loss(launched), "toy")
    assert launched_losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), launched.state_dict().values()))

