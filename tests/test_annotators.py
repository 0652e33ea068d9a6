"""controlnet-aux and transformers annotators, with randomly initialised networks saved locally."""
import hashlib
import types

import numpy as np
import pytest
import torch

from pd_data import annotators_ext as ext
from pd_data.annotate import ANNOTATORS, get_annotator


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _square(size=64, lo=0.25, hi=0.75) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with a sharp bright square, and the square's mask."""
    img = np.full((size, size, 3), 30, np.uint8)
    mask = np.zeros((size, size), bool)
    a, b = int(size * lo), int(size * hi)
    mask[a:b, a:b] = True
    img[mask] = 220
    return img, mask


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No weights from the environment and an empty, offline Hugging Face cache."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(ext.AUX_ENV, raising=False)
    monkeypatch.delenv(ext.SEG_ENV, raising=False)
    # huggingface_hub reads these at import time: patch the module-level values it uses per call.
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def aux_weights(tmp_path_factory):
    """Random-init controlnet-aux networks saved under the file names their loaders expect."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    d = tmp_path_factory.mktemp("aux-weights")
    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), d / "ControlNetHED.pth")
    torch.save(Generator(3, 1, 3).state_dict(), d / "sk_model.pth")
    torch.save(Generator(3, 1, 3).state_dict(), d / "sk_model2.pth")
    torch.save(MobileV2_MLSD_Large().state_dict(), d / "mlsd_large_512_fp32.pth")
    return d


def _check_map(out, image):
    assert out.shape == image.shape and out.dtype == np.uint8


def test_canny_marks_the_outline_only():
    img, mask = _square(64)
    a = ANNOTATORS["controlnet_aux"]["canny"](None)
    out = a(img, {})
    _check_map(out, img)
    assert a.weights_hash == "" and a.name == "controlnet_aux.CannyDetector" and a.version
    edges = out[..., 0] > 0
    inside = mask & np.roll(mask, 3, 0) & np.roll(mask, -3, 0) & np.roll(mask, 3, 1) & np.roll(mask, -3, 1)
    outside = ~(mask | np.roll(mask, 3, 0) | np.roll(mask, -3, 0) | np.roll(mask, 3, 1) | np.roll(mask, -3, 1))
    assert not edges[inside].any() and not edges[outside].any()
    border = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    near_border = border | np.roll(border, 1, 0) | np.roll(border, -1, 0) | np.roll(border, 1, 1) | np.roll(border, -1, 1)
    assert edges[near_border].mean() > 0.3
    assert set(np.unique(out)) <= {0, 255}


def test_registry_through_get_annotator():
    a = get_annotator("controlnet_aux", "canny")
    img, _ = _square(32)  # below the detectors' 64-px grid: still returned at the input's size
    _check_map(a(img, {}), img)
    assert {"canny", "hed", "scribble", "depth", "normal", "lineart", "mlsd"} <= set(ANNOTATORS["controlnet_aux"])
    assert set(ANNOTATORS["transformers"]) == {"seg"}


def test_hed_and_scribble_load_saved_weights(aux_weights):
    expected = _sha256(aux_weights / "ControlNetHED.pth")
    img, _ = _square(64)
    for modality, name in [("hed", "controlnet_aux.HEDdetector"), ("scribble", "controlnet_aux.HEDdetector+scribble")]:
        a = get_annotator("controlnet_aux", modality, aux_weights)
        assert a.weights_hash == expected and a.name == name
        out = a(img, {})
        _check_map(out, img)
        odd = np.ascontiguousarray(img[:40, :56])  # not a multiple of 64: resized back
        _check_map(a(odd, {}), odd)
    assert set(np.unique(out)) <= {0, 255}  # scribble stays binary


def test_lineart_and_mlsd_load_saved_weights(aux_weights):
    img, _ = _square(64)
    lineart = get_annotator("controlnet_aux", "lineart", aux_weights)
    assert lineart.weights_hash == _sha256(aux_weights / "sk_model.pth") + "+" + _sha256(aux_weights / "sk_model2.pth")
    _check_map(lineart(img, {}), img)
    mlsd = get_annotator("controlnet_aux", "mlsd", aux_weights)
    assert mlsd.weights_hash == _sha256(aux_weights / "mlsd_large_512_fp32.pth")
    _check_map(mlsd(img, {}), img)


def test_normal_loads_saved_weights(tmp_path):
    from controlnet_aux.normalbae.nets.NNET import NNET

    # NormalBaeDetector's loader reads the state dict under "model", as in the released scannet.pt.
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet",
                                 sampling_ratio=0.4, importance_ratio=0.7)
    torch.save({"model": NNET(args).state_dict()}, tmp_path / "scannet.pt")
    a = get_annotator("controlnet_aux", "normal", tmp_path)
    assert a.weights_hash == _sha256(tmp_path / "scannet.pt")
    img, _ = _square(64)
    _check_map(a(img, {}), img)


def test_depth_through_the_model_seam():
    """MiDaS dpt_hybrid is ~490 MB at random init: a stand-in network checks the wrapping."""

    class Brightness(torch.nn.Module):
        """(1, 3, H, W) in [-1, 1] -> (1, H, W): 'nearer' where brighter, like a depth model's output."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * x.mean(dim=1)

    img, mask = _square(96)  # detected at 128 px, resized back
    a = ext.ControlNetAuxAnnotator.from_model("depth", Brightness(), weights_hash="abc")
    out = a(img, {})
    _check_map(out, img)
    assert a.name == "controlnet_aux.MidasDetector" and a.weights_hash == "abc"
    assert out[mask].mean() > out[~mask].mean() + 100


@pytest.mark.parametrize("modality, filename", [
    ("hed", "ControlNetHED.pth"), ("scribble", "ControlNetHED.pth"), ("depth", "dpt_hybrid-midas-501f0c75.pt"),
    ("normal", "scannet.pt"), ("lineart", "sk_model2.pth"), ("mlsd", "mlsd_large_512_fp32.pth"),
])
def test_missing_weights_name_the_file(modality, filename, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    factory = ANNOTATORS["controlnet_aux"][modality]
    with pytest.raises(FileNotFoundError, match=filename) as e:
        factory(empty)
    assert str(empty) in str(e.value) and ext.AUX_ENV in str(e.value)
    # Nothing configured and nothing in the (empty, offline) Hugging Face cache.
    with pytest.raises(FileNotFoundError, match=filename):
        factory(None)
    monkeypatch.setenv(ext.AUX_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match=filename):
        factory(None)


def test_weights_from_env_and_from_hf_cache(aux_weights, offline_hub, monkeypatch):
    expected = _sha256(aux_weights / "ControlNetHED.pth")
    monkeypatch.setenv(ext.AUX_ENV, str(aux_weights))
    assert get_annotator("controlnet_aux", "hed").weights_hash == expected
    monkeypatch.delenv(ext.AUX_ENV)
    # The Hugging Face cache layout: refs/main names a snapshot holding the file.
    repo = offline_hub / "models--lllyasviel--Annotators"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "ControlNetHED.pth").symlink_to(aux_weights / "ControlNetHED.pth")
    assert get_annotator("controlnet_aux", "hed").weights_hash == expected


def test_palette_is_controlnets_ade20k():
    from controlnet_aux.util import ade_palette

    assert ext.ADE20K_PALETTE.shape == (150, 3) and ext.ADE20K_PALETTE.dtype == np.uint8
    assert np.array_equal(ext.ADE20K_PALETTE, np.array(ade_palette()))


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    """A tiny UperNet (ConvNext backbone) with 150 labels, saved as transformers saves it."""
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(0)
    backbone = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32, num_labels=150)
    d = tmp_path_factory.mktemp("seg")
    UperNetForSemanticSegmentation(config).save_pretrained(d)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(d)
    return d


def test_seg_colours_classes_with_the_palette(seg_dir, monkeypatch):
    img = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    a = get_annotator("transformers", "seg", seg_dir)
    out = a(img, {})
    _check_map(out, img)
    assert a.name == "transformers.UperNetForSemanticSegmentation" and a.version
    assert a.weights_hash == _sha256(seg_dir / "model.safetensors")
    palette = {tuple(c) for c in ext.ADE20K_PALETTE.tolist()}
    assert {tuple(c) for c in out.reshape(-1, 3).tolist()} <= palette
    monkeypatch.setenv(ext.SEG_ENV, str(seg_dir))
    assert get_annotator("transformers", "seg").weights_hash == a.weights_hash


def test_seg_missing_weights(tmp_path, monkeypatch):
    factory = ANNOTATORS["transformers"]["seg"]
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        factory(tmp_path)
    assert str(tmp_path) in str(e.value) and ext.SEG_ENV in str(e.value)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "preprocessor_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        factory(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        factory(None)  # no env, empty offline cache


def test_bad_input_is_a_clear_error():
    a = get_annotator("controlnet_aux", "canny")
    with pytest.raises(ValueError, match="uint8 RGB"):
        a(np.zeros((8, 8), np.float32), {})
