"""Controllability scores: the ceiling for a perfect read, worse for a blurred or other-layout one, and
hand-computed mIoU, pixel accuracy, F1 and normal angles."""
import numpy as np
import pytest
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from pd_data import procedural
from pd_data.annotator_weights import ADE20K_PALETTE
from pd_eval.control import (CONTROL_METRICS, METRICS, MSSSIM_MIN_SIDE, control_scores, control_spec, dataset_miou,
                             seg_counts, summarise)

PALETTES = {"seg": procedural.SEG_PALETTE}


def scene_maps(res: int = 32, n: int = 6) -> dict[str, np.ndarray]:
    """Maps of n scenes from n groups (so every neighbour is another layout): modality -> (n, res, res, 3)."""
    renders = [procedural.render(procedural.make_group(g, 1, 1)[0][0][0], res, texture_seed=g) for g in range(n)]
    return {m: np.stack([r[m] for r in renders]) for m in procedural.MODALITIES}


@pytest.fixture(scope="module")
def maps():
    return scene_maps()


def _scores(modality, read, query):
    return control_scores(modality, read, query, PALETTES.get(modality))


def _headline(modality, read, query) -> float:
    """The headline figure as reported (dataset mIoU, RMSE, mean SSIM, ...)."""
    spec = control_spec(modality)
    return summarise(modality, read, query, PALETTES.get(modality), resamples=0)[spec.headline(*query.shape[1:3])].value


def _worse(modality, a: float, b: float) -> bool:
    """Whether a is a worse score than b on the headline of `modality`."""
    name = control_spec(modality).headline(32, 32)
    return a < b if METRICS[name].higher_is_better else a > b


@pytest.mark.parametrize("modality", sorted(CONTROL_METRICS))
def test_a_perfect_read_scores_the_ceiling(maps, modality):
    query = maps[modality]
    for name, per_image in _scores(modality, query.copy(), query).items():
        assert per_image.shape == (len(query),)
        np.testing.assert_allclose(per_image, METRICS[name].ceiling, atol=1e-4, err_msg=name)
    assert _headline(modality, query.copy(), query) == pytest.approx(METRICS[control_spec(modality).headline(32, 32)].ceiling, abs=1e-4)


def test_a_perfect_ade20k_read_scores_miou_one():
    labels = np.random.default_rng(0).integers(0, len(ADE20K_PALETTE), (3, 16, 16))
    query = ADE20K_PALETTE[labels].astype(np.uint8)
    s = control_scores("seg", query.copy(), query, ADE20K_PALETTE)
    np.testing.assert_allclose(s["ctrl_miou"], 1.0)
    assert dataset_miou(*seg_counts(query, query, ADE20K_PALETTE)) == 1.0


@pytest.mark.parametrize("modality", sorted(CONTROL_METRICS))
def test_another_layout_or_a_shifted_map_scores_worse_than_a_noisy_correct_one(maps, modality):
    query = maps[modality]
    noise = np.random.default_rng(1).integers(-24, 25, query.shape)
    noisy = np.clip(query.astype(int) + noise, 0, 255).astype(np.uint8)  # the right layout, imperfectly drawn
    correct = _headline(modality, noisy, query)
    assert _worse(modality, _headline(modality, np.roll(query, 1, axis=0), query), correct)  # another scene's map
    assert _worse(modality, _headline(modality, np.roll(query, 4, axis=2), query), correct)  # moved 4 px right


@pytest.mark.parametrize("modality", ["hed", "scribble"])
def test_a_blurred_soft_edge_read_scores_lower_ssim_than_the_sharp_map(modality):
    for res, name in ((32, "ctrl_ssim"), (MSSSIM_MIN_SIDE, "ctrl_msssim")):
        sharp = scene_maps(res, 3)[modality]
        x = sharp.astype(np.float64)
        for _ in range(2 * (res // 32)):  # a 3x3 box blur, twice per 32 px: as blurred at every size
            x = sum(np.roll(np.roll(x, dy, 1), dx, 2) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
        blurred = x.round().astype(np.uint8)
        s_sharp, s_blur = _scores(modality, sharp, sharp), _scores(modality, blurred, sharp)
        assert set(s_blur) == {name, "ctrl_rmse"}
        assert (s_blur[name] < s_sharp[name] - 0.05).all(), s_blur[name]
        assert control_spec(modality).headline(res, res) == name


def test_msssim_min_side_is_the_smallest_size_torchmetrics_accepts():
    def ok(side):
        x = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(0))
        try:
            multiscale_structural_similarity_index_measure(x, x, data_range=1.0, kernel_size=11)
            return True
        except ValueError:
            return False

    assert ok(MSSSIM_MIN_SIDE) and not ok(MSSSIM_MIN_SIDE - 1)


# A three-colour palette; reads are off-palette by a little, to be snapped back.
A, B, C = (0, 0, 0), (255, 0, 0), (0, 255, 0)
PAL = np.array([A, B, C])


def test_miou_and_pixel_accuracy_of_a_hand_computed_case():
    query = np.array([[[A, A], [B, B]], [[A, A], [A, A]]], np.uint8)  # (2, 2, 2, 3)
    read = np.array([[[(10, 5, 0), B], [(250, 3, 3), C]], [[A, A], [A, A]]], np.uint8)
    s = control_scores("seg", read, query, PAL)
    # Image 0: A IoU 1/2 (one of two), B 1/3 (one shared of three), C 0/1; three classes present.
    # Image 1: only A, all right.
    np.testing.assert_allclose(s["ctrl_miou"], [(1 / 2 + 1 / 3 + 0) / 3, 1.0])
    np.testing.assert_allclose(s["ctrl_pixel_acc"], [2 / 4, 1.0])
    # Pooled: A 5/6 (1 + 4 of 2 + 4), B 1/3, C 0/1.
    assert dataset_miou(*seg_counts(read, query, PAL)) == pytest.approx((5 / 6 + 1 / 3 + 0) / 3)
    v = summarise("seg", read, query, PAL, resamples=50)["ctrl_dataset_miou"]
    assert v.value == pytest.approx(7 / 18) and v.ci_low <= v.value <= v.ci_high


def _gray(rows) -> np.ndarray:
    return np.repeat(np.array(rows, np.uint8)[..., None], 3, axis=-1)


def test_canny_f1_of_a_hand_computed_case():
    query = _gray([[[255, 255, 0, 0], [255, 128, 0, 0]],   # 4 edges (128 counts)
                   [[0, 0, 0, 0], [0, 0, 0, 0]],           # none
                   [[0, 0, 0, 0], [0, 0, 0, 0]]])
    read = _gray([[[255, 200, 255, 0], [127, 128, 0, 255]],  # 3 of them (127 does not count) and 2 more
                  [[0, 0, 0, 0], [0, 0, 0, 0]],              # none in both: F1 1 by definition
                  [[0, 0, 255, 0], [0, 0, 0, 0]]])           # edges where there are none: F1 0
    f1 = control_scores("canny", read, query)["ctrl_f1"]
    np.testing.assert_allclose(f1, [2 * 3 / (2 * 3 + 2 + 1), 1.0, 0.0])


def test_normal_angle_of_a_hand_made_case():
    # (255, 255, 255) decodes to (1, 1, 1); (0, 0, 0) to its opposite; (255, 255, 0) to (1, 1, -1).
    query = np.full((2, 1, 2, 3), 255, np.uint8)
    read = np.array([[[(255, 255, 255), (0, 0, 0)]], [[(255, 255, 0), (255, 255, 0)]]], np.uint8)
    angle = control_scores("normal", read, query)["ctrl_angle"]
    np.testing.assert_allclose(angle, [(0 + 180) / 2, np.degrees(np.arccos(1 / 3))], atol=1e-6)  # 90 and 70.53


def test_normals_decode_as_procedural_normal_map_encodes_them():
    # Nearness rising one image width per image width: the surface is tilted 45 degrees from a flat one.
    res = 16
    ramp = np.tile(np.arange(res) / res, (res, 1))
    read, query = procedural.normal_map(ramp)[None], procedural.normal_map(np.zeros((res, res)))[None]
    assert tuple(query[0, 0, 0]) == (128, 128, 255)  # facing the camera
    assert control_scores("normal", read, query)["ctrl_angle"][0] == pytest.approx(45.0, abs=0.5)


def test_bad_input_names_the_value_and_the_fix(maps):
    with pytest.raises(ValueError, match=r"'sketch'.*known modalities.*'canny'"):
        control_scores("sketch", maps["hed"], maps["hed"])
    with pytest.raises(ValueError, match=r"need palette=.*SEG_PALETTE"):
        control_scores("seg", maps["seg"], maps["seg"])
    with pytest.raises(ValueError, match=r"take no palette="):
        control_scores("depth", maps["depth"], maps["depth"], PAL)
    with pytest.raises(ValueError, match=r"\(6, 32, 31, 3\).*resize"):
        control_scores("depth", maps["depth"][:, :, :31], maps["depth"])
    with pytest.raises(ValueError, match=r"float64.*uint8"):
        control_scores("depth", maps["depth"].astype(float), maps["depth"])
