import warnings

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid
from PIL import Image
from torchmetrics.image.kid import poly_mmd

from pd_eval.features import RandomConvFeatures, load_extractor
from pd_eval.metrics import (_mean, _rmse, bootstrap, fid, frechet, interval, kernel_distance, kid, map_similarity,
                             mean_of, per_image_mse, rmse, rmse_of)

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels


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


def _old_percentile(stat, n, resamples, seed):
    """The Python loop `bootstrap` was before scipy: percentile interval of n indices drawn per resample."""
    rng = np.random.default_rng(seed)
    return tuple(np.percentile([stat(rng.integers(n, size=n)) for _ in range(resamples)], [2.5, 97.5]))


def _sets(n1=10, n2=10, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n1, d)), rng.normal(0.5, 1.2, size=(n2, d))


def test_fid_and_kid_keep_their_values_and_their_intervals_to_float_rounding():
    """Point estimates as before (to float rounding); the intervals of scipy's paired percentile bootstrap are the old
    loop's (same draws from the seed), so Table 1's FID and KID intervals do not move."""
    f_gen, f_real = _sets()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = frechet(f_gen, f_real, resamples=60, seed=3)
        # frechet computes at one BLAS thread, this call at the default: equal within rounding, not bitwise
        assert got.value == pytest.approx(float(cleanfid.fid_from_feats(f_gen, f_real)), rel=1e-9, abs=0)
        old = _old_percentile(lambda i: cleanfid.fid_from_feats(f_gen[i], f_real[i]), 10, 60, 3)
    assert (got.ci_low, got.ci_high) == pytest.approx(old, rel=1e-9)
    fg, fr = torch.from_numpy(f_gen), torch.from_numpy(f_real)
    k = kernel_distance(f_gen, f_real, resamples=60, seed=3, subsets=5)
    assert k.value == kernel_distance(f_gen, f_real, resamples=0, seed=3, subsets=5).value
    old = _old_percentile(lambda i: float(poly_mmd(fr[i], fg[i])), 10, 60, 3)
    assert (k.ci_low, k.ci_high) == pytest.approx(old, rel=1e-12)


def test_sets_of_different_sizes_are_resampled_whole():
    """The old loop drew indices below the smaller size for both sets, so the larger set's last rows never
    entered its interval; now each set is resampled on its own."""
    f_gen, f_real = _sets(10, 14)
    far = f_real.copy()
    far[10:] += 50.0  # rows 10..13: outliers only the larger set has
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        near, outlying = frechet(f_gen, f_real, 40, 0), frechet(f_gen, far, 40, 0)
    assert outlying.ci_low > 10 * near.ci_high


@pytest.mark.parametrize("metric", [rmse_of, mean_of])
def test_per_image_values_are_unchanged_and_their_intervals_seeded_and_around_them(metric):
    mse = np.random.default_rng(4).lognormal(-4, 1, 12)
    a, b, c = metric(mse, 200, 0), metric(mse, 200, 0), metric(mse, 200, 1)
    assert a.value == (np.sqrt(np.mean(mse)) if metric is rmse_of else np.mean(mse)) and a.n == 12
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high) != (c.ci_low, c.ci_high)
    assert a.ci_low < a.value < a.ci_high


def test_degenerate_inputs_keep_their_intervals_without_warnings():
    """One image: no interval (NaN). All images equal: the point (BCa's 0 / 0 falls back to percentile).
    Two images: the percentile interval, their smaller and larger value. No resamples: NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one, flat, two = mean_of(np.array([0.3])), rmse_of(np.full(8, 0.25)), mean_of(np.array([0.1, 0.4]))
        none = mean_of(np.array([0.1, 0.4]), resamples=0)
        hits = bootstrap(lambda i: float(np.zeros(24)[i].mean()), 24, 200, 0)  # task inference's copy-example
    assert one.value == 0.3 and np.isnan(one.ci_low) and np.isnan(one.ci_high)
    assert (flat.value, flat.ci_low, flat.ci_high) == (0.5, 0.5, 0.5)
    assert (two.ci_low, two.ci_high) == (0.1, 0.4)
    assert np.isnan(none.ci_low) and np.isnan(none.ci_high)
    assert hits == (0.0, 0.0)


def _coverage(draw, truth, statistic, method, resamples, trials=1000):
    rng = np.random.default_rng(0)
    bounds = [interval((draw(rng),), statistic, resamples, t, method) for t in range(trials)]
    return float(np.mean([lo <= truth <= hi for lo, hi in bounds]))


def test_bca_intervals_cover_near_95_percent_at_12_images_and_beat_percentile_on_skewed_errors():
    """Normal data, n = 12, 200 resamples: about 90% (a bootstrap interval is a z interval with the 1/n
    variance: too narrow at 12 observations, whatever the method). RMSE of lognormal per-image errors
    (skewed, as map errors are): BCa covers more than percentile once it has the resamples for its tails."""
    normal = _coverage(lambda r: r.normal(3.0, 1.0, 12), 3.0, _mean, "BCa", 200)
    assert 0.86 <= normal <= 0.95
    truth = np.sqrt(np.exp(-4 + 0.5))  # sqrt(E[mse]) of lognormal(-4, 1)
    bca, pct = (_coverage(lambda r: r.lognormal(-4, 1, 12), truth, _rmse, m, 2000, 2000) for m in ("BCa", "percentile"))
    assert bca > pct + 0.01  # 0.84 against 0.82; both below 95%: 12 skewed errors are few
