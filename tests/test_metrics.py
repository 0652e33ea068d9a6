import numpy as np
from PIL import Image

from pd_eval.features import RandomConvFeatures, load_extractor
from pd_eval.metrics import bootstrap, fid, kid, map_similarity, per_image_mse, rmse


def test_rmse_matches_hand_computation():
    out = np.zeros((2, 2, 2, 1), np.uint8)
    tgt = np.zeros((2, 2, 2, 1), np.uint8)
    tgt[0] = 255          # image 0: every pixel off by 1.0 -> mse 1
    tgt[1, 0, 0, 0] = 51  # image 1: one of 4 pixels off by 0.2 -> mse 0.04 / 4 = 0.01
    assert np.allclose(per_image_mse(out, tgt), [1.0, 0.01])
    assert np.isclose(rmse(out, tgt, resamples=0).value, np.sqrt((1.0 + 0.01) / 2))


def _folder(path, images):
    path.mkdir(parents=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(path / f"{i}.png")
    return path


def test_fid_is_near_zero_for_the_same_set_and_larger_for_a_shifted_one(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 200, (40, 32, 32, 3), dtype=np.uint8)
    a = _folder(tmp_path / "a", imgs)
    same = _folder(tmp_path / "same", imgs)
    shifted = _folder(tmp_path / "shift", np.clip(imgs.astype(int) + 55, 0, 255).astype(np.uint8))
    name, extractor = load_extractor()
    assert name == RandomConvFeatures.name  # no Inception weights on this machine
    f_same = fid(a, same, extractor, resamples=0).value
    f_shift = fid(a, shifted, extractor, resamples=0).value
    assert abs(f_same) < 1e-3 and f_shift > 100 * max(abs(f_same), 1e-3)


def test_bootstrap_interval_covers_the_truth():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(40):
        x = rng.normal(3.0, 1.0, 200)
        lo, hi = bootstrap(lambda idx: x[idx].mean(), len(x), 300, trial)
        covered += lo <= 3.0 <= hi
    assert covered >= 34  # ~95% nominal


def test_kid_is_near_zero_for_the_same_set_and_larger_for_a_shifted_one():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 200, (24, 32, 32, 3), dtype=np.uint8)
    shifted = np.clip(imgs.astype(int) + 55, 0, 255).astype(np.uint8)
    _, extractor = load_extractor()
    same = kid(imgs, imgs, extractor, resamples=0, subsets=10)
    shift = kid(shifted, imgs, extractor, resamples=30, subsets=10)
    assert shift.n == 24 and abs(same.value) < 0.02 * shift.value
    assert shift.ci_low > abs(same.value) and shift.ci_low <= shift.value <= shift.ci_high


def test_ssim_and_psnr_are_perfect_for_identical_maps_and_worse_for_noisy_ones():
    rng = np.random.default_rng(2)
    maps = rng.integers(100, 140, (6, 32, 32, 3), dtype=np.uint8)  # low contrast: noise dominates SSIM
    noisy = np.clip(maps.astype(int) + rng.integers(-40, 41, maps.shape), 0, 255).astype(np.uint8)
    ident = map_similarity(maps, np.clip(maps.astype(int) + 1, 0, 255).astype(np.uint8), resamples=0)
    worse = map_similarity(noisy, maps, resamples=50)
    assert ident["ssim"].value > 0.99 and worse["ssim"].value < 0.9
    mse = per_image_mse(noisy, maps)
    assert np.isclose(worse["psnr"].value, np.mean(10 * np.log10(1 / mse)), rtol=1e-4)
    assert worse["psnr"].ci_low <= worse["psnr"].value <= worse["psnr"].ci_high


def test_bar_and_confusion_plots_are_written_even_with_undefined_intervals(tmp_path):
    from pd_eval.visuals import confusion_plot, metric_bars

    rows = [{"task": "image->hed", "model": m, "value": v, "ci_low": lo, "ci_high": hi}
            for m, v, lo, hi in [("prompt-diffusion", 0.2, 0.15, 0.25), ("baseline/mean-map", 0.3, float("nan"), float("nan"))]]
    assert metric_bars({"rmse": rows, "ssim": rows[:1]}, tmp_path / "b.png", "t").stat().st_size > 1000
    assert confusion_plot(np.eye(3, dtype=int) * 4, ["depth", "hed", "seg"], tmp_path / "c.png", "t").stat().st_size > 1000
