"""Data parallelism and gradient accumulation change how a step's global batch is computed, never
which samples, noise and timesteps it holds: the trained weights match one process, one micro-batch."""
import pytest
import torch
from safetensors.torch import load_file

from pd_data.dataset import load_split
from pd_data.tasks import TRAINING_TASKS
from pd_model.base import load_base
from pd_model.config import TrainConfig
from pd_model.train import ModelSpec, train_controlnet
from pd_model.train_dist import TrainJob, launch, run_job

CFG = TrainConfig(steps=3, batch_size=4, learning_rate=1e-4, warmup_steps=2, device="cpu")
TOL = 1e-5


@pytest.fixture
def world(train_world):
    return train_world


def _job(world, out, cfg: TrainConfig = CFG, init: str | None = None) -> TrainJob:
    return TrainJob(base=str(world / "base"), images=str(world / "img"), annotations=str(world / "ann"), cfg=cfg,
                    spec=ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, cfg.steps), out=str(out), init=init)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_micro_batches_of_4_train_like_one_batch_of_8(world):
    data = load_split(world / "img", world / "ann", "train")
    nets = {}
    for accum in (1, 2):
        cfg = CFG.model_copy(update={"batch_size": 8, "grad_accum_steps": accum})
        net, losses = train_controlnet(load_base(world / "base"), data, cfg, ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, cfg.steps))
        nets[accum] = (net.state_dict(), losses)
    assert max_diff(nets[1][0], nets[2][0]) < TOL
    assert nets[1][1] == pytest.approx(nets[2][1], abs=1e-6)  # the logged loss is the global-batch mean
    first = train_controlnet(load_base(world / "base"), data, CFG.model_copy(update={"steps": 1}),
                             ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, 1))[0].state_dict()
    assert max_diff(first, nets[1][0]) > 10 * TOL  # the weights did move: the comparison above means something


def test_two_gloo_processes_train_like_one_process(world, tmp_path):
    def job(processes: int, out: str, init: str | None = None) -> TrainJob:
        return _job(world, tmp_path / out, CFG.model_copy(update={"processes": processes}), init)

    def weights(d: str) -> dict:
        return load_file(tmp_path / d / "controlnet" / "diffusion_pytorch_model.safetensors")

    run_job(job(1, "one"))
    launch(job(2, "two"))  # torchrun, 2 CPU processes, gloo
    assert max_diff(weights("one"), weights("two")) < TOL
    losses = [torch.tensor(__import__("json").loads((tmp_path / d / "losses.json").read_text())["loss"]) for d in ("one", "two")]
    assert torch.allclose(*losses, atol=1e-6)
    # Retraining continues a saved ControlNet (TrainJob.init), on two processes as on one.
    init = str(tmp_path / "one" / "controlnet")
    run_job(job(1, "more-one", init))
    launch(job(2, "more-two", init))
    assert max_diff(weights("more-one"), weights("more-two")) < TOL
    assert max_diff(weights("more-one"), weights("one")) > 10 * TOL  # from `one`, not a fresh copy (that is `one` again)


def test_a_batch_that_does_not_split_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"batch_size=6 .* multiple of 4 \(e\.g\. 8\)"):
        TrainConfig(batch_size=6, processes=2, grad_accum_steps=2)
    with pytest.raises(ValueError, match="smaller than train.processes=4"):
        TrainConfig(batch_size=2, processes=4)


def test_a_continued_model_with_its_own_decoder_continues_that_decoder(world, tmp_path):
    cfg = CFG.model_copy(update={"train_unet_decoder": True})

    def unet(folder) -> dict:
        return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")

    run_job(_job(world, tmp_path / "first", cfg))
    run_job(_job(world, tmp_path / "more", cfg, str(tmp_path / "first" / "controlnet")))
    base, first, more = unet(world / "base"), unet(tmp_path / "first"), unet(tmp_path / "more")
    # 3 more steps from `first`'s decoder: nearer to it than to the base's, which is 6 steps away.
    assert max_diff(more, first) < max_diff(more, base)


def test_loader_workers_change_nothing_in_the_weights_bitwise(world):
    """Samples are composed from (seed, step, i) alone, by the loop or by 2 DataLoader processes alike."""
    data = load_split(world / "img", world / "ann", "train")
    nets = {}
    for workers in (0, 2):
        cfg = CFG.model_copy(update={"loader_workers": workers})
        stats: dict = {}
        net, losses = train_controlnet(load_base(world / "base"), data, cfg,
                                       ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, cfg.steps), stats=stats)
        nets[workers] = (net.state_dict(), losses)
        assert stats["loader_workers"] == workers and 0 <= stats["data_wait_s"] <= stats["wall_s"]
    assert nets[0][1] == nets[2][1]
    assert all(torch.equal(nets[0][0][k], nets[2][0][k]) for k in nets[0][0])


def _launched(world, out, processes: int, accum: int, launcher: str = "torchrun") -> dict:
    launch(_job(world, out, CFG.model_copy(update={"processes": processes, "grad_accum_steps": accum, "launcher": launcher})))
    return load_file(out / "controlnet" / "diffusion_pytorch_model.safetensors")


def test_two_processes_train_bitwise_like_one_with_the_same_micro_batches(world, tmp_path):
    """One process with two micro-batches sums the same two gradients as two processes' all-reduce:
    the weights are bitwise equal (both through torchrun, so both compute on one thread)."""
    one, two = _launched(world, tmp_path / "p1a2", 1, 2), _launched(world, tmp_path / "p2a1", 2, 1)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # Two micro-batches in each of two processes: DDP's no_sync accumulates the first locally, and the
    # second's backward all-reduces the sum; the same weights up to summation order.
    assert max_diff(_launched(world, tmp_path / "p2a2", 2, 2), one) < TOL


def test_accelerate_launch_trains_what_torchrun_trains(world, tmp_path):
    """train.launcher=accelerate (`accelerate launch`) runs the same job: bitwise torchrun's weights at
    the same process count, and one process's within float summation order at the same micro-batches."""
    by_torchrun = _launched(world, tmp_path / "torchrun-p2a1", 2, 1)
    two = _launched(world, tmp_path / "accelerate-p2a1", 2, 1, "accelerate")
    assert two.keys() == by_torchrun.keys() and all(torch.equal(two[k], by_torchrun[k]) for k in two)
    one = _launched(world, tmp_path / "accelerate-p1a2", 1, 2, "accelerate")  # accelerate's one-process launcher
    assert max_diff(one, two) < TOL


def test_accelerate_s_one_process_launcher_asked_for_more_is_refused(world, tmp_path, monkeypatch, capsys):
    """Without --multi_gpu, `accelerate launch --num_processes 2` on a machine without GPUs starts one
    process (no WORLD_SIZE): it would train the whole job alone, on every machine it runs on."""
    from pd_model.train_dist import main

    path = tmp_path / "job.json"
    path.write_text(_job(world, tmp_path / "out").model_dump_json())
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert main([str(path)]) == 2 and "--multi_gpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_launcher_is_not_part_of_the_train_key(tmp_path):
    from conftest import TINY
    from flows.plan import Plan
    from flows.profiles import load_profile
    from pd_core.state import StateDir

    def key(train: dict) -> str:
        return Plan.build(load_profile("smoke", {**TINY, "train": {**TINY["train"], **train}}), StateDir(tmp_path)).key("train")

    assert key({"launcher": "accelerate"}) == key({"launcher": "torchrun"}) != key({"learning_rate": 3e-4})
