"""controlnet-aux and transformers annotators, with randomly initialised networks saved locally."""
import hashlib
import types

import numpy as np
import pytest
import torch

from pd_data import annotator_weights as aw
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
    monkeypatch.delenv(aw.AUX_ENV, raising=False)
    monkeypatch.delenv(aw.SEG_ENV, raising=False)
    monkeypatch.delenv(aw.DEPTH_ENV, raising=False)
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


def _cache_snapshot(cache, repo: str, files: dict) -> None:
    """The Hugging Face cache layout: refs/main names a snapshot holding (links to) the files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    for name, target in files.items():
        (root / "snapshots" / commit / name).symlink_to(target)


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
    assert set(ANNOTATORS["transformers"]) == {"seg", "depth"}


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
    assert f"{empty} (from data.annotator_weights=" in str(e.value) and aw.AUX_ENV in str(e.value)
    # Nothing configured and nothing in the (empty, offline) Hugging Face cache.
    with pytest.raises(FileNotFoundError, match=f"data.annotator_weights is not set.*{filename}"):
        factory(None)
    monkeypatch.setenv(aw.AUX_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match=f"from \\${aw.AUX_ENV}=.*{filename}.*data.annotator_weights"):
        factory(None)


@pytest.mark.parametrize("backend, modality", [(b, m) for b in ("controlnet_aux", "transformers")
                                               for m in sorted(ANNOTATORS[b]) if m != "canny"])
def test_every_missing_weights_error_names_the_setting(backend, modality, tmp_path):
    for call in (ANNOTATORS[backend][modality], lambda d: aw.resolve_weights(backend, modality, d)):
        for weights_dir in (tmp_path, None):
            with pytest.raises(FileNotFoundError, match="data.annotator_weights") as e:
                call(weights_dir)
            assert "Nothing is downloaded" in str(e.value)


def test_resolve_weights_finds_without_loading(aux_weights):
    assert aw.resolve_weights("controlnet_aux", "canny") == []
    assert aw.resolve_weights("controlnet_aux", "lineart", aux_weights) == [aux_weights / "sk_model.pth",
                                                                            aux_weights / "sk_model2.pth"]
    with pytest.raises(ValueError, match="known"):
        aw.resolve_weights("transformers", "hed")


def test_weights_from_env_and_from_hf_cache(aux_weights, offline_hub, monkeypatch):
    expected = _sha256(aux_weights / "ControlNetHED.pth")
    hed = ANNOTATORS["controlnet_aux"]["hed"]  # the factory: get_annotator would return its cached instance
    monkeypatch.setenv(aw.AUX_ENV, str(aux_weights))
    assert hed(None).weights_hash == expected
    monkeypatch.delenv(aw.AUX_ENV)
    with pytest.raises(FileNotFoundError):
        hed(None)
    _cache_snapshot(offline_hub, aw.AUX_REPO, {"ControlNetHED.pth": aux_weights / "ControlNetHED.pth"})
    assert hed(None).weights_hash == expected


def test_palette_is_controlnets_ade20k():
    from controlnet_aux.util import ade_palette

    assert aw.ADE20K_PALETTE.shape == (150, 3) and aw.ADE20K_PALETTE.dtype == np.uint8
    assert np.array_equal(aw.ADE20K_PALETTE, np.array(ade_palette()))


@pytest.fixture(scope="module")
def hf_weights(tmp_path_factory):
    """A data.annotator_weights folder holding tiny random transformers annotators in their sub-folders:
    a UperNet (ConvNext backbone, 150 labels) with its processor, and a DPT-hybrid (BiT backbone, like
    Intel/dpt-hybrid-midas) without one, so the annotator builds MiDaS's own preprocessing."""
    from transformers import (BitConfig, ConvNextConfig, DPTConfig, DPTForDepthEstimation, SegformerImageProcessor,
                              UperNetConfig, UperNetForSemanticSegmentation)

    torch.manual_seed(0)
    backbone = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32, num_labels=150)
    d = tmp_path_factory.mktemp("annotator-weights")
    UperNetForSemanticSegmentation(config).save_pretrained(d / "upernet-convnext-small")
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(d / "upernet-convnext-small")
    # The hybrid's BiT stem and stages reduce 64 px by 16 to a 4x4 map of 32 channels; its first two
    # stages feed the neck directly (neck_hidden_sizes[:2] are their widths).
    bit = BitConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1], num_groups=4,
                    layer_type="bottleneck", global_padding="same", embedding_dynamic_padding=True,
                    out_features=["stage1", "stage2", "stage3"])
    dpt = DPTConfig(is_hybrid=True, backbone_config=bit, image_size=64, hidden_size=16, num_hidden_layers=4,
                    num_attention_heads=2, intermediate_size=32, backbone_out_indices=[0, 1, 2, 3],
                    neck_hidden_sizes=[8, 16, 16, 16], reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16,
                    backbone_featmap_shape=[1, 32, 4, 4])
    DPTForDepthEstimation(dpt).save_pretrained(d / "dpt-hybrid-midas")
    return d


def test_seg_colours_classes_with_the_palette(hf_weights, monkeypatch):
    img = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    a = get_annotator("transformers", "seg", hf_weights)
    out = a(img, {})
    _check_map(out, img)
    assert a.name == "transformers.UperNetForSemanticSegmentation" and a.version
    assert a.weights_hash == _sha256(hf_weights / "upernet-convnext-small" / "model.safetensors")
    assert a.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    palette = {tuple(c) for c in aw.ADE20K_PALETTE.tolist()}
    assert {tuple(c) for c in out.reshape(-1, 3).tolist()} <= palette
    batch = a.batch([img, img[::-1].copy(), img[:32, :32].copy()])  # a different shape runs on its own
    assert [m.shape for m in batch] == [img.shape, img.shape, (32, 32, 3)]
    assert (batch[0] == out).mean() > 0.99  # its own map, up to float rounding at class ties
    factory = ANNOTATORS["transformers"]["seg"]
    monkeypatch.setenv(aw.SEG_ENV, str(hf_weights / "upernet-convnext-small"))  # the model folder itself
    assert factory(None).weights_hash == a.weights_hash
    monkeypatch.delenv(aw.SEG_ENV)
    monkeypatch.setenv(aw.AUX_ENV, str(hf_weights))  # read as data.annotator_weights is
    assert factory(None).weights_hash == a.weights_hash


def test_depth_is_a_per_image_normalised_midas_map(hf_weights, offline_hub, monkeypatch):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    dark, _ = _square(48, 0.2, 0.6)
    dark = np.ascontiguousarray(np.pad(dark // 8, ((0, 0), (16, 16), (0, 0))))  # (48, 80, 3), nearly black
    a = get_annotator("transformers", "depth", hf_weights)
    assert a.name == "transformers.DPTForDepthEstimation" and a.version
    assert a.weights_hash == _sha256(hf_weights / "dpt-hybrid-midas" / "model.safetensors")
    assert a.processor.size == {"height": 64, "width": 64}  # no processor config: the network's input size
    out = a(img, {})
    _check_map(out, img)
    assert (out == out[..., :1]).all()  # one value, three channels
    assert np.array_equal(out, a(img, {}))  # deterministic
    # Normalised per image, never per batch: a dark image's map spans the range as a bright one's does,
    # and each map in a batch is the map of its image alone.
    singles = [a(x, {}) for x in (img, dark)]
    batch = a.batch([img, dark, img[:32, :32].copy()])
    assert [m.shape for m in batch] == [img.shape, dark.shape, (32, 32, 3)]
    for m, single in zip(batch, singles):
        assert np.abs(m.astype(int) - single).max() <= 1 and m.min() < 30 and m.max() > 200
    monkeypatch.setenv(aw.DEPTH_ENV, str(hf_weights / "dpt-hybrid-midas"))
    depth = ANNOTATORS["transformers"]["depth"]
    assert np.array_equal(depth(None)(img, {}), out)  # a fresh load draws the same map
    monkeypatch.delenv(aw.DEPTH_ENV)
    folder = hf_weights / "dpt-hybrid-midas"
    _cache_snapshot(offline_hub, aw.DEPTH_REPO, {f.name: f for f in folder.iterdir()})
    assert depth(None).weights_hash == a.weights_hash


@pytest.mark.parametrize("modality, folder, first", [
    ("seg", "upernet-convnext-small", "config.json"), ("depth", "dpt-hybrid-midas", "config.json")])
def test_transformers_missing_weights_name_setting_folder_and_files(modality, folder, first, tmp_path, monkeypatch):
    factory, spec = ANNOTATORS["transformers"][modality], aw.HF_SPECS[modality]
    with pytest.raises(FileNotFoundError, match=first) as e:
        factory(tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / folder} (from data.annotator_weights=" in msg and f"<data.annotator_weights>/{folder}/" in msg
    assert spec.env in msg and spec.repo in msg
    (tmp_path / folder).mkdir()
    for f in spec.configs:
        (tmp_path / folder / f).write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors") as e:
        factory(tmp_path)
    assert "config.json" not in str(e.value).split(";")[0]  # only what is missing is listed as missing
    with pytest.raises(FileNotFoundError, match=f"data.annotator_weights is not set.*{first}.*{folder}/"):
        factory(None)  # no env, empty offline cache
    monkeypatch.setenv(spec.env, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"nowhere \\(from \\${spec.env}="):
        factory(None)


def test_naming_the_model_folder_itself_says_to_name_its_parent(hf_weights):
    with pytest.raises(FileNotFoundError, match="is itself a model folder: set data.annotator_weights to the folder"):
        get_annotator("transformers", "depth", hf_weights / "dpt-hybrid-midas")  # the model folder, not its parent


def test_bad_input_is_a_clear_error():
    a = get_annotator("controlnet_aux", "canny")
    with pytest.raises(ValueError, match="uint8 RGB"):
        a(np.zeros((8, 8), np.float32), {})
