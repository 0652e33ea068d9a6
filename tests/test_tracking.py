"""Experiment tracking: TensorBoard event files hold every step's loss, lr, grad norm and samples/s, the
validation grids and the configuration; the evaluation's metrics join the same run; 'none' writes
nothing; tracking changes no weight and no key; a tracker that is not installed fails at plan time.
The warm-up schedule (diffusers' get_scheduler) trains at the same learning rates as the old LambdaLR."""
import json
import shutil

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from conftest import TINY
from flows.profiles import ConfigError, load_profile
from pd_data.dataset import load_split
from pd_data.tasks import TRAINING_TASKS
from pd_model import tracking
from pd_model.base import load_base
from pd_model.checkpoint import list_checkpoints
from pd_model.config import BaseModelConfig, TrainConfig
from pd_model.loop import warmup_schedule
from pd_model.tracking import Tracking, accelerator_args, log_metrics, open_run
from pd_model.train import ModelSpec, train_controlnet
from pd_model.train_base import train_base

LR, WARM, STEPS = 1e-3, 2, 3
CFG = TrainConfig(steps=STEPS, batch_size=4, learning_rate=LR, warmup_steps=WARM, validate_every=2, ema_decay=0.9,
                  device="cpu", mixed_precision="no")
SCALARS = ["train/grad_norm", "train/loss", "train/lr", "train/samples_per_s"]


def _train(root, folder, cfg=CFG):
    base = load_base(root / "base").freeze()
    data = load_split(root / "img", root / "ann", "train")
    net, losses = train_controlnet(base, data, cfg, ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS,
                                                              cfg.steps), folder=folder)
    return net.state_dict(), losses


def _events(logs) -> EventAccumulator:
    return EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()


@pytest.fixture(scope="module")
def tracked(train_world, tmp_path_factory):
    """One 3-step run with the default tracker (TensorBoard) and validation grids at steps 2 and 3."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tracked") / "prompt-diffusion"
    weights, losses = _train(train_world, folder)
    return folder, weights, losses


def test_tensorboard_logs_each_step_the_grids_and_the_config(tracked):
    folder, _, losses = tracked
    ev = _events(folder / "logs")
    assert sorted(ev.Tags()["scalars"]) == SCALARS
    assert all([e.step for e in ev.Scalars(tag)] == [1, 2, 3] for tag in SCALARS)
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx(losses)
    assert all(e.value > 0 for tag in ("train/grad_norm", "train/samples_per_s") for e in ev.Scalars(tag))
    assert [e.value for e in ev.Scalars("train/lr")] == pytest.approx([LR / 2, LR, LR])  # min(1, (s + 1) / 2) at s = 0, 1, 2
    grids = ev.Images("validation")
    assert [g.step for g in grids] == [2, 3]
    assert (grids[0].width, grids[0].height) == Image.open(folder / "validation" / "step-0000002.png").size
    start = ev.PluginTagToContent("hparams")["_hparams_/session_start_info"]  # the HParams tab
    hparams = HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["train.learning_rate"].number_value == LR and hparams["model.tasks"].string_value == json.dumps(TRAINING_TASKS)
    config = json.loads(ev.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode().strip("`json\n"))
    assert config["train"]["report_to"] == "tensorboard" and config["model"]["steps"] == STEPS
    assert config["resolved"]["device"] == "cpu"
    assert json.loads((folder / "logs" / "tracker.json").read_text())["step"] == STEPS


def test_evaluation_metrics_join_the_run_that_trained_the_model(tracked, tmp_path):
    folder, _, _ = tracked
    assert log_metrics(folder, [("fid", "image->depth", 12.5), ("clip_score", "depth->image", 0.25)])
    ev = _events(folder / "logs")
    assert [(e.step, e.value) for e in ev.Scalars("eval/image-to-depth/fid")] == [(STEPS, 12.5)]
    assert [(e.step, e.value) for e in ev.Scalars("eval/depth-to-image/clip_score")] == [(STEPS, 0.25)]
    assert len(ev.Scalars("train/loss")) == STEPS  # the training's events are all still shown
    assert not log_metrics(tmp_path / "never-tracked", [("fid", "image->depth", 1.0)])


def test_none_writes_nothing_and_tracking_changes_no_weight(tracked, train_world, tmp_path):
    _, tracked_weights, tracked_losses = tracked
    folder = tmp_path / "prompt-diffusion"
    weights, losses = _train(train_world, folder, CFG.model_copy(update={"report_to": "none"}))
    assert not (folder / "logs").exists() and sorted(p.name for p in folder.iterdir()) == ["validation"]
    assert losses == tracked_losses
    assert weights.keys() == tracked_weights.keys() and all(torch.equal(weights[k], tracked_weights[k]) for k in weights)


def test_a_resumed_run_shows_each_step_once(train_world, tmp_path):
    torch.set_num_threads(1)
    folder = tmp_path / "prompt-diffusion"
    cfg = CFG.model_copy(update={"validate_every": 0, "checkpoint_every": 2})
    _, first = _train(train_world, folder, cfg)  # checkpoints at 2 and 3
    shutil.rmtree(list_checkpoints(folder / "checkpoints")[-1])  # as if killed after logging step 3, before its save
    _, resumed = _train(train_world, folder, cfg)  # resumes at step 2 and logs step 3 again
    ev = _events(folder / "logs")
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx(first) and resumed == first


def test_only_the_main_process_of_a_torchrun_training_logs(train_world, tmp_path):
    from pd_model.train_dist import TrainJob, launch

    cfg = CFG.model_copy(update={"steps": 2, "processes": 2, "validate_every": 0})
    out = tmp_path / "prompt-diffusion"
    launch(TrainJob(base=str(train_world / "base"), images=str(train_world / "img"), annotations=str(train_world / "ann"),
                    cfg=cfg, spec=ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, 2), out=str(out)))
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    ev = _events(out / "logs")
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx(json.loads((out / "losses.json").read_text())["loss"])


def test_the_base_training_is_tracked_too(train_world, tmp_path):
    base = load_base(train_world / "base")
    cfg = BaseModelConfig(train_steps=2, batch_size=4)
    train_base(base, load_split(train_world / "img", train_world / "ann", "train"), cfg,
               track=Tracking("tensorboard", tmp_path / "logs", "base", {"base": cfg.model_dump()}))
    assert [e.step for e in _events(tmp_path / "logs").Scalars("train/lr")] == [1, 2]


def test_a_bad_report_to_is_a_clear_error():
    with pytest.raises(ValidationError, match="report_to"):
        TrainConfig(report_to="tensorbord")
    with pytest.raises(ConfigError, match=r"train\.report_to='comet': Input should be 'tensorboard', 'wandb', 'mlflow' or 'none'"):
        load_profile("smoke", {"train": {"report_to": "comet"}})


@pytest.mark.parametrize("report_to", ["wandb", "mlflow", "tensorboard"])
def test_a_tracker_that_is_not_installed_fails_at_plan_time_naming_pip(monkeypatch, report_to):
    monkeypatch.setattr(tracking, "installed", lambda package: False)
    with pytest.raises(ConfigError, match=rf"needs the {report_to} package, which is not installed: run `pip install {report_to}`"):
        load_profile("smoke", {"train": {"report_to": report_to}})


@pytest.mark.skipif(tracking.installed("wandb"), reason="wandb is installed here")
def test_wandb_without_wandb_is_refused_before_training():
    with pytest.raises(ValidationError, match="pip install wandb"):
        TrainConfig(report_to="wandb")


def test_report_to_is_not_part_of_the_train_key(tmp_path):
    from flows.plan import Plan
    from pd_core.state import StateDir

    def key(train: dict) -> str:
        return Plan.build(load_profile("smoke", {**TINY, "train": {**TINY["train"], **train}}), StateDir(tmp_path)).key("train")

    assert key({"report_to": "tensorboard"}) == key({"report_to": "none"}) != key({"learning_rate": 3e-4})
    assert "report_to" not in CFG.identity() and CFG.identity() == CFG.model_copy(update={"report_to": "none"}).identity()


@pytest.mark.parametrize("warm", [0, 1, 3, 5])
def test_the_warmup_schedule_trains_at_the_old_learning_rates_and_resumes(warm, tmp_path):
    def rates(sched, opt, n):
        out = []
        for _ in range(n):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    p = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW(p, lr=LR)
    old = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)  # the loop's before
    expected = rates(old, opt, 8)
    opt = torch.optim.AdamW(p, lr=LR)
    new = warmup_schedule(opt, warm)
    assert rates(new, opt, 4) == pytest.approx(expected[:4], rel=1e-15, abs=0)
    torch.save(new.state_dict(), tmp_path / "sched.pt")  # as the loop's checkpoints keep it
    opt = torch.optim.AdamW(p, lr=LR)
    resumed = warmup_schedule(opt, warm)
    resumed.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=True))
    assert rates(resumed, opt, 4) == pytest.approx(expected[4:], rel=1e-15, abs=0)


@pytest.mark.parametrize("report_to", ["wandb", "mlflow"])
def test_wandb_and_mlflow_runs_are_local_resumed_and_take_the_evaluation(report_to, tmp_path, monkeypatch):
    """Only where the optional package is installed: a run, its resume, then the evaluation, in one run."""
    pytest.importorskip(report_to)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: nothing leaves the machine
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    png = tmp_path / "grid.png"
    Image.new("RGB", (8, 8)).save(png)
    track = Tracking(report_to, tmp_path / "model" / "logs", "prompt-diffusion", {"train": CFG.model_dump()})
    from accelerate import Accelerator

    for start in (0, 2):
        t = open_run(Accelerator(**accelerator_args(track)), track, start)
        for step in range(start + 1, 4):
            t.scalars({"train/loss": 1.0 / step}, step)
        t.image("validation", png, 3)
        t.close(3)
    run = json.loads((tmp_path / "model" / "logs" / "tracker.json").read_text())
    assert log_metrics(tmp_path / "model", [("fid", "image->depth", 12.5)])
    if report_to == "wandb":
        # offline-run-<time>-<id>[-n]: one run id for the three processes (`wandb sync` merges them)
        assert {p.name.split("-")[3] for p in (tmp_path / "model" / "logs" / "wandb").glob("offline-run-*")} == {run["run_id"]}
    else:
        from mlflow.tracking import MlflowClient

        c = MlflowClient(f"sqlite:///{tmp_path / 'model' / 'logs' / 'mlflow.db'}")
        assert [(m.step, m.value) for m in c.get_metric_history(run["run_id"], "eval/image-to-depth/fid")] == [(3, 12.5)]
        assert c.get_run(run["run_id"]).data.params["train.report_to"] == "tensorboard"
