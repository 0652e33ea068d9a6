"""train.train_unet_decoder: the trained decoder is saved with the model and used wherever it is loaded."""
import json

import torch

from pd_data.tasks import TRAINING_TASKS
from pd_eval.config import EvalConfig
from pd_eval.generation import GenerationJob, Models
from pd_model.base import load_base
from pd_model.config import TrainConfig
from pd_model.pipeline import PromptDiffusionPipeline
from pd_model.train import ModelSpec
from pd_model.train_dist import TrainJob, run_job
import pytest

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels


def test_a_trained_decoder_is_saved_with_the_model_and_loaded_with_it(train_world, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, learning_rate=1e-2, train_unet_decoder=True)
    out = tmp_path / "model"
    run_job(TrainJob(base=str(train_world / "base"), images=str(train_world / "img"), annotations=str(train_world / "ann"),
                     cfg=cfg, spec=ModelSpec("pd", "prompt-diffusion", TRAINING_TASKS, 2), out=str(out)))
    assert json.loads((out / "pipeline.json").read_text())["unet"] == "unet"

    trained = PromptDiffusionPipeline.from_trained(out).unet.state_dict()
    original = load_base(train_world / "base").unet.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in trained if k.startswith("up_blocks"))  # decoder moved
    assert all(torch.equal(trained[k], original[k]) for k in trained if k.startswith("down_blocks"))  # encoder frozen

    job = GenerationJob(base=str(train_world / "base"), models={"pd": str(out)}, images="", annotations="", split="test",
                        cfg=EvalConfig(), out=str(tmp_path / "eval"))
    sampled = Models(job, torch.device("cpu")).get("pd")[0].unet.state_dict()
    assert all(torch.equal(sampled[k], trained[k]) for k in trained)  # the benchmark samples this model with its own UNet


def test_retraining_with_the_decoder_keeps_each_candidates_own_unet(prefect_engine, state_dir):
    from conftest import TINY
    from flows.profiles import merge_settings
    from flows.retrain import retrain_flow
    from pd_model.pipeline import load_trained

    over = merge_settings(TINY, {"train": {"train_unet_decoder": True}})
    r1, r2 = retrain_flow("smoke", over, dataset="dec"), retrain_flow("smoke", over, dataset="dec")
    base = load_base(state_dir / "data" / "live" / "dec" / "base").unet.state_dict()
    u1, u2 = (load_trained(f"{r['live_dir']}/candidates/{r['model_id']}")[2].state_dict() for r in (r1, r2))
    ups = [k for k in base if k.startswith("up_blocks")]
    assert any(not torch.equal(u1[k], base[k]) for k in ups)  # each candidate has its own trained decoder,
    assert any(not torch.equal(u2[k], u1[k]) for k in ups)    # the second continued from the first's
