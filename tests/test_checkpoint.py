"""Training checkpoints: a killed run resumes to bitwise the same weights; a broken save loses nothing."""
import multiprocessing as mp
import time

import pytest
import torch

from pd_data.dataset import load_split
from pd_data.tasks import TRAINING_TASKS
from pd_model import checkpoint as ckpt_mod
from pd_model.base import load_base
from pd_model.checkpoint import list_checkpoints
from pd_model.config import TrainConfig
from pd_model.train import train_controlnet

STEPS = 8
CFG = TrainConfig(steps=STEPS, batch_size=4, checkpoint_every=2, keep_last=2, learning_rate=1e-3, warmup_steps=3,
                  ema_decay=0.9)  # EMA state must survive the kill too


@pytest.fixture(scope="module")
def world(train_world):
    """The shared tiny dataset and base of conftest (read only here)."""
    return train_world


def _train(root, ckpt_dir, steps=STEPS):
    base = load_base(root / "base").freeze()
    data = load_split(root / "img", root / "ann", "train")
    net, losses = train_controlnet(base, data, TRAINING_TASKS, CFG.model_copy(update={"steps": steps}),
                                   "prompt_diffusion", steps, checkpoint_dir=ckpt_dir)
    return net, losses


def _train_in_child(root, ckpt_dir):
    torch.set_num_threads(1)
    _train(root, ckpt_dir)


def test_killed_training_resumes_to_bitwise_identical_weights(world, tmp_path):
    torch.set_num_threads(1)  # the child runs single-threaded too: same kernels, same sums
    whole, whole_losses = _train(world, tmp_path / "whole")
    proc = mp.get_context("spawn").Process(target=_train_in_child, args=(world, tmp_path / "killed"))
    proc.start()
    deadline = time.monotonic() + 300
    while not list_checkpoints(tmp_path / "killed") and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.join()
    done = list_checkpoints(tmp_path / "killed")
    assert done and int(done[-1].name.split("-")[1]) < STEPS, "the kill should land before the end"
    resumed, resumed_losses = _train(world, tmp_path / "killed")
    torch.set_num_threads(torch.get_num_threads())
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_losses == whole_losses
    assert len(list_checkpoints(tmp_path / "whole")) == CFG.keep_last


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_usable(world, tmp_path, monkeypatch):
    _train(world, tmp_path / "c", steps=2)
    assert [p.name for p in list_checkpoints(tmp_path / "c")] == ["step-0000002"]

    def dying_save(tensors, path):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _train(world, tmp_path / "c", steps=4)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "c")] == ["step-0000002"]
    net, losses = _train(world, tmp_path / "c", steps=4)  # resumes from step 2 and finishes
    assert len(losses) == 4 and [p.name for p in list_checkpoints(tmp_path / "c")] == ["step-0000002", "step-0000004"]


def test_nan_loss_stops_with_the_last_good_checkpoint(world, tmp_path):
    from pd_model.train import Checkpointing, Optim, _loop

    w = torch.nn.Parameter(torch.ones(3))
    model = torch.nn.Module()
    model.w = w
    calls = []

    def step_loss(step, idx):
        calls.append(step)
        return (w * (float("nan") if step == 5 else 1.0)).sum()

    with pytest.raises(FloatingPointError, match="step-0000004"):
        _loop([w], Optim(10, 1, 1e-2), step_loss, "toy", ckpt=Checkpointing(tmp_path / "toy", model, every=2))
    assert calls[-1] == 5


def test_the_best_checkpoint_is_kept_by_validation_loss_not_recency(tmp_path):
    from pd_model.checkpoint import read_trainer
    from pd_model.train import Checkpointing, Optim, _loop

    w = torch.nn.Parameter(torch.zeros(2))
    model = torch.nn.Module()
    model.w = w
    scores = iter([3.0, 1.0, 2.0, 1.5])  # step 4 is best; 6 and 8 are later but worse
    seen = []

    def val_loss():
        seen.append(w.detach().clone())
        return next(scores)

    ck = Checkpointing(tmp_path / "toy", model, every=2, keep_last=1, val_loss=val_loss)
    _loop([w], Optim(8, 1, 1e-1), lambda step, idx: (w - 1).pow(2).sum(), "toy", ckpt=ck)
    best = tmp_path / "toy" / "best"
    assert read_trainer(best) == {"step": 4, "val_loss": 1.0}
    assert torch.equal(ckpt_mod.load_file(best / "model.safetensors")["w"], seen[1])  # the weights scored at step 4
    assert read_trainer(list_checkpoints(tmp_path / "toy")[-1])["best"]["step"] == 4
    assert [p.name for p in (tmp_path / "toy").glob("best-*")] == ["best-step-0000004"]  # older bests removed


def test_validation_loss_is_deterministic_and_recorded_with_the_best_weights(world, tmp_path):
    from pd_model.checkpoint import read_trainer
    from pd_model.controlnet import PromptDiffusionControlNet
    from pd_model.train import TextCache, validation_loss, validation_prompts
    from pd_data.tasks import get_task

    _train(world, tmp_path / "v", steps=4)
    root = tmp_path / "v"
    best = read_trainer(root / "best")
    assert best["step"] in (2, 4) and read_trainer(list_checkpoints(root)[-1])["best"]["step"] == best["step"]
    base = load_base(world / "base").freeze()
    data = load_split(world / "img", world / "ann", "train")
    net = PromptDiffusionControlNet.from_unet(base.unet, conditioning_embedding_out_channels=(16,))
    net.load_state_dict(ckpt_mod.load_file(root / "best" / "model.safetensors"))
    prompts = validation_prompts(data, [get_task(t) for t in TRAINING_TASKS], CFG.validation_samples, CFG.seed + 1)
    # EMA is on in CFG: best/ holds the EMA weights, which are what was scored.
    assert validation_loss(base, net, prompts, TextCache(base), CFG.seed) == pytest.approx(best["val_loss"], rel=1e-6)
