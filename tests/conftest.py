"""Shared fixtures: a real Prefect engine (test harness), a state directory per test, tiny sizes."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Prefect's home for the whole test session lives in a temporary folder, never in ~/.prefect.
_HOME = Path(tempfile.mkdtemp(prefix="pd-tests-prefect-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)  # a session's Prefect database is not worth keeping
os.environ["PREFECT_HOME"] = str(_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)

# Sizes that keep an end-to-end run to seconds; the smoke profile with these overrides.
TINY = {
    "data": {"n_groups": 6, "split_fractions": [0.5, 0.0, 0.5]},  # 24 images: 6 groups x 2 layouts x 2 twins
    "prompts": {"per_task": 3},
    "base": {"train_steps": 8, "batch_size": 4},
    "train": {"steps": 4, "batch_size": 4, "baseline_steps_per_task": 2},
    "eval": {"steps": 3, "bootstrap": 20, "reader_steps": 10},
}


def live_controlnet(net):
    """A ControlNet whose zero convolutions are no longer zero (seeded), so that its hints matter."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


@pytest.fixture(scope="session")
def prefect_engine():
    """A real Prefect API (temporary SQLite database), shared by the tests of one session."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "state"
    monkeypatch.setenv("PD_STATE_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def train_world(tmp_path_factory) -> Path:
    """A tiny annotated dataset (all train split) and an untrained tiny base: what ControlNet training reads."""
    from pd_data.annotate import annotate_shard
    from pd_data.config import DataConfig
    from pd_data.dataset import load_split
    from pd_data.ingest import ingest
    from pd_model.base import build_tiny_base
    from pd_model.config import BaseModelConfig

    root = tmp_path_factory.mktemp("train-world")
    cfg = DataConfig(n_groups=3, split_fractions=(1.0, 0.0, 0.0))
    ingest(cfg, root / "img")
    for p in sorted((root / "img").glob("images-*.parquet")):
        annotate_shard(p, root / "ann" / p.name.replace("images", "annotations"), cfg.annotators)
    data = load_split(root / "img", root / "ann", "train")
    build_tiny_base(BaseModelConfig(), sorted(set(data.captions.values())), 32).save(root / "base")
    return root


@pytest.fixture
def mirror_annotator(monkeypatch):
    """A weight-free annotator, backend "test", modality "mirror": the image flipped left to right."""
    from pd_data import annotate

    class Mirror:
        name, version, weights_hash = "test.mirror", "0", ""

        def __call__(self, image, provenance):
            return image[:, ::-1].copy()

    monkeypatch.setitem(annotate.ANNOTATORS, "test", {"mirror": lambda weights_dir: Mirror()})
    annotate.get_annotator.cache_clear()
    yield
    annotate.get_annotator.cache_clear()


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """20 JPEG photos directly in one folder, captions in a CSV without a group column; HED weights."""
    import torch
    from PIL import Image

    from pd_data import procedural

    root = tmp_path_factory.mktemp("photos")
    rows = ["file,caption"]
    for g in range(20):
        scene, text = procedural.make_group(g, 1, 1)[0][0]
        Image.fromarray(procedural.render(scene, 48, texture_seed=g)["image"]).save(root / f"IMG_{g:04d}.jpg", quality=90)
        rows.append(f'IMG_{g:04d}.jpg,"{text}"')
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows.append('broken.jpg,"a broken file"')
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    from controlnet_aux.hed import ControlNetHED_Apache2

    weights = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), weights / "ControlNetHED.pth")
    return root, weights


def folder_overrides(root, weights) -> dict:
    """The smoke profile on a folder of photos (the `photos` fixture), HED and Canny from controlnet-aux."""
    procedural_only = {"n_groups"}  # the folder source has its own groups
    from flows.profiles import merge_settings

    return merge_settings({**TINY, "data": {k: v for k, v in TINY["data"].items() if k not in procedural_only}}, {
        "data": {"source": "folder", "source_path": str(root), "captions_file": str(root / "captions.csv"),
                 "annotators": {"hed": "controlnet_aux", "canny": "controlnet_aux"}, "annotator_weights": str(weights),
                 "split_fractions": [0.5, 0.0, 0.5]},
        "eval": {"task_inference_queries": 0}})
