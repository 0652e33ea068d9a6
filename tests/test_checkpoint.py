"""Training checkpoints: a run killed at any step resumes to bitwise the same weights (the ControlNet,
the decoder it trains, its EMA, and the tiny base alike); a broken save loses nothing."""
import multiprocessing as mp
import time

import pytest
import torch

from pd_data.dataset import load_split
from pd_data.tasks import TRAINING_TASKS
from pd_model import checkpoint as ckpt_mod
from pd_model.base import load_base
from pd_model.checkpoint import list_checkpoints
from pd_model.config import BaseModelConfig, TrainConfig
from pd_model.train import ModelSpec, train_controlnet
from pd_model.train_base import train_base

STEPS = 8
CFG = TrainConfig(steps=STEPS, batch_size=4, checkpoint_every=2, keep_last=2, learning_rate=1e-3, warmup_steps=3,
                  ema_decay=0.9)  # EMA state must survive the kill too
# The demo's shape: the UNet decoder is trained with the ControlNet, and both have an EMA.
DEMO_SHAPED = CFG.model_copy(update={"train_unet_decoder": True})
BASE = BaseModelConfig(train_steps=STEPS, batch_size=4, checkpoint_every=2, ema_decay=0.9, train_text_encoder=True)


@pytest.fixture(scope="module")
def world(train_world):
    """The shared tiny dataset and base of conftest (read only here)."""
    return train_world


def _train(root, folder, steps=STEPS, cfg=CFG) -> dict[str, torch.Tensor]:
    """Every trained weight of one ControlNet run: the ControlNet's, and the UNet's (its decoder moves
    with train_unet_decoder), and the losses."""
    base = load_base(root / "base").freeze()
    data = load_split(root / "img", root / "ann", "train")
    net, losses = train_controlnet(base, data, cfg.model_copy(update={"steps": steps}),
                                   ModelSpec("pd", "prompt-diffusion", TRAINING_TASKS, steps), folder=folder)
    return {**{f"cn.{k}": v for k, v in net.state_dict().items()},
            **{f"unet.{k}": v for k, v in base.unet.state_dict().items()}}, losses


def _train_base(root, folder) -> tuple[dict[str, torch.Tensor], list[float]]:
    base = load_base(root / "base")
    losses = train_base(base, load_split(root / "img", root / "ann", "train"), BASE, checkpoint_dir=folder)
    return {**base.unet.state_dict(), **{f"te.{k}": v for k, v in base.text_encoder.state_dict().items()}}, losses


def _in_child(fn, *args):
    torch.set_num_threads(1)
    fn(*args)


def _killed_then_resumed(fn, args, folder, ckpt_dir):
    """Run fn in a child, kill -9 it once its first checkpoint lands, then run it again here."""
    proc = mp.get_context("spawn").Process(target=_in_child, args=(fn, *args))
    proc.start()
    deadline = time.monotonic() + 300
    while not list_checkpoints(ckpt_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.join()
    done = list_checkpoints(ckpt_dir)
    assert done and int(done[-1].name.split("-")[1]) < STEPS, "the kill should land before the end"
    return fn(*args)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 (accelerate's autocast and scaler) needs CUDA")


@pytest.mark.parametrize("cfg", [CFG, DEMO_SHAPED, DEMO_SHAPED.model_copy(update={"mixed_precision": "bf16"}),
                                 pytest.param(CFG.model_copy(update={"mixed_precision": "fp16", "device": "cuda"}), marks=CUDA)],
                         ids=["controlnet", "controlnet+decoder", "bf16 channels_last", "fp16 grad scaler"])
def test_killed_training_resumes_to_bitwise_identical_weights(world, tmp_path, cfg):
    torch.set_num_threads(1)  # the child runs single-threaded too: same kernels, same sums
    whole, whole_losses = _train(world, tmp_path / "whole", cfg=cfg)
    resumed, resumed_losses = _killed_then_resumed(_train, (world, tmp_path / "killed", STEPS, cfg), tmp_path / "killed",
                                                   tmp_path / "killed" / "checkpoints")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert resumed_losses == whole_losses
    assert len(list_checkpoints(tmp_path / "whole" / "checkpoints")) == CFG.keep_last
    untouched = load_base(world / "base").unet.state_dict()
    moved = [k for k in untouched if not torch.equal(untouched[k], whole[f"unet.{k}"])]
    # The decoder trains (and so must be checkpointed) only in the demo's shape; the encoder never does.
    assert bool(moved) == cfg.train_unet_decoder and all(k.startswith(("up_blocks", "conv_norm_out", "conv_out")) for k in moved)


def test_killed_base_training_resumes_to_bitwise_identical_weights(world, tmp_path):
    torch.set_num_threads(1)
    whole, whole_losses = _train_base(world, tmp_path / "whole")
    resumed, resumed_losses = _killed_then_resumed(_train_base, (world, tmp_path / "killed"), tmp_path / "killed",
                                                   tmp_path / "killed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole) and resumed_losses == whole_losses


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_usable(world, tmp_path, monkeypatch):
    ckpts = tmp_path / "c" / "checkpoints"
    _train(world, tmp_path / "c", steps=2)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-0000002"]

    def dying_save(tensors, path):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _train(world, tmp_path / "c", steps=4)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-0000002"]
    _, losses = _train(world, tmp_path / "c", steps=4)  # resumes from step 2 and finishes
    assert len(losses) == 4 and [p.name for p in list_checkpoints(ckpts)] == ["step-0000002", "step-0000004"]


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path):
    from pd_model.loop import Checkpointing, Optim, run

    w = torch.nn.Parameter(torch.ones(3))
    model = torch.nn.Module()
    model.w = w
    calls = []

    def step_loss(step, idx):
        calls.append(step)
        return (w * (float("nan") if step == 5 else 1.0)).sum()

    with pytest.raises(FloatingPointError, match="step-0000004"):
        run([w], Optim(10, 1, 1e-2), step_loss, "toy", ckpt=Checkpointing(tmp_path / "toy", {"toy": model}, every=2))
    assert calls[-1] == 5


def test_a_checkpoint_is_safetensors_and_files_that_load_with_weights_only(world, tmp_path, monkeypatch):
    """The weights and the EMA are safetensors; accelerate's optimizer, schedule and RNG files are read
    back with torch.load(weights_only=True) only: resuming runs no code from a checkpoint."""
    _train(world, tmp_path / "c", steps=2)
    saved = list_checkpoints(tmp_path / "c" / "checkpoints")[-1]
    assert sorted(p.name for p in saved.iterdir()) == ["ema.safetensors", "model.safetensors", "optimizer.bin",
                                                       "random_states_0.pkl", "scheduler.bin", "trainer.json"]
    weights_only = []
    load = torch.load

    def recording_load(*args, **kwargs):
        weights_only.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    _, losses = _train(world, tmp_path / "c", steps=3)  # resumes at step 2
    assert len(losses) == 3 and len(weights_only) >= 3 and all(w is True for w in weights_only)
