"""Validation grids during training: saved at the right steps, one row per prompt, published in a flow run,
and invisible to training (bitwise the same weights as a run without them)."""
import numpy as np
import torch
from PIL import Image
from prefect import flow

from pd_data.dataset import load_split
from pd_data.tasks import TRAINING_TASKS, get_task
from pd_model.visuals import prompt_grid
from pd_model.base import load_base
from pd_model.config import TrainConfig
from pd_model.train import ModelSpec, train_controlnet
import pytest

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

CFG = TrainConfig(steps=3, batch_size=4, learning_rate=1e-3, ema_decay=0.9, device="cpu", mixed_precision="no")


def _train(root, validate_every, folder=None, on_grid=None):
    base = load_base(root / "base").freeze()
    data = load_split(root / "img", root / "ann", "train")
    net, _ = train_controlnet(base, data, CFG.model_copy(update={"validate_every": validate_every}),
                              ModelSpec("prompt-diffusion", "prompt-diffusion", TRAINING_TASKS, CFG.steps), folder=None if folder is None else folder.parent, on_grid=on_grid)
    return net.state_dict()


def test_grids_are_saved_published_and_leave_the_weights_untouched(train_world, tmp_path, prefect_engine):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.artifacts import publish_grid

    torch.set_num_threads(1)
    plain = _train(train_world, 0, tmp_path / "off")
    assert not (tmp_path / "off").exists()
    folder = tmp_path / "model" / "validation"

    @flow
    def train_in_a_flow():
        return _train(train_world, 2, folder, on_grid=lambda path, step: publish_grid(path, step, "prompt-diffusion"))

    with_grids = train_in_a_flow()
    assert all(torch.equal(plain[k], with_grids[k]) for k in plain)
    assert [p.name for p in sorted(folder.iterdir())] == ["step-0000002.png", "step-0000003.png"]  # every 2 and the last
    data = load_split(train_world / "img", train_world / "ann", "train")
    one_per_task = [data.sample_prompt(get_task(t), np.random.default_rng(0)) for t in TRAINING_TASKS]
    expected = prompt_grid(one_per_task, np.zeros((len(TRAINING_TASKS), 32, 32, 3), np.uint8)).size
    assert all(Image.open(p).size == expected for p in folder.iterdir())  # one row per task

    publish_grid(folder / "step-0000002.png", 2, "outside")  # outside a run: nothing, and no error
    with get_client(sync_client=True) as client:
        made = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["validation-prompt-diffusion-step-2", "validation-prompt-diffusion-step-3", "validation-outside-step-2"])))
    # One card per step, each a picture in Markdown (an image artifact's page prints its data URL as text).
    assert sorted(a.key for a in made) == ["validation-prompt-diffusion-step-2", "validation-prompt-diffusion-step-3"]
    assert all(a.type == "markdown" and "](data:image/png;base64," in a.data for a in made)
