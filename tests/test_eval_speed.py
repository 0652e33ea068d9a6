"""FID at one BLAS thread (pd_eval.metrics.frechet on small features) gives the numbers of the default
threading, and leaves the thread count as it found it (timings: scripts/bench_metrics.py).

"The same numbers" is within float rounding, not to the bit: a BLAS splits its sums differently at
one thread and at two, and on some CPUs (AMD EPYC with OpenBLAS's Haswell kernels) that moves the
last bit of an FID. `TOLERANCE` is far below anything a reader of Table 1 sees (4 decimals) and far
above what reordering a sum of 128 x 128 products can do."""
import warnings

import numpy as np
import pytest
from cleanfid import fid as cleanfid
from threadpoolctl import threadpool_info, threadpool_limits

from pd_eval.metrics import SINGLE_THREAD_FID_DIM, MetricValue, frechet, set_interval

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels


def _default_threads_frechet(f1, f2, resamples, seed) -> MetricValue:
    """`frechet` as it was before the thread limit: clean-fid per resample, BLAS threads untouched."""
    value = float(cleanfid.fid_from_feats(f1, f2))
    lo, hi = set_interval(lambda i, j: cleanfid.fid_from_feats(f1[i], f2[j]), len(f1), len(f2), resamples, seed)
    return MetricValue(value, lo, hi, len(f1))


def _sets(n1, n2, d=128, seed=0):
    """Non-negative, correlated features (as ReLU features are); fewer rows than dimensions: singular."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / d ** 0.5
    return np.maximum(rng.normal(size=(n1, d)) @ mix, 0), np.maximum(rng.normal(0.3, 1.1, size=(n2, d)) @ mix, 0)


# Relative: an FID's summation order moves it by a few ulps (about 1e-15); a wrong feature, resample or
# interval end moves it by percent.
TOLERANCE = 1e-9


def _numbers(m: MetricValue) -> tuple:
    return m.value, m.ci_low, m.ci_high


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm of singular products: expected on small sets
        yield


@pytest.mark.parametrize("n1,n2,d", [(16, 16, 128), (8, 12, 128), (8, 8, 64), (30, 30, 16)])
def test_one_thread_frechet_equals_the_default_threads_within_rounding(n1, n2, d):
    f1, f2 = _sets(n1, n2, d, seed=n1 * n2 + d)
    with threadpool_limits(2, user_api="blas"):  # two threads, even on a one-core runner
        old = _default_threads_frechet(f1, f2, 24, 3)
        new = frechet(f1, f2, 24, 3)
    assert new.n == old.n and _numbers(new) == pytest.approx(_numbers(old), rel=TOLERANCE, abs=0)
    assert old.ci_low < old.ci_high


def test_frechet_limits_blas_threads_for_small_features_only_and_restores_them(monkeypatch):
    if not _blas_threads():
        pytest.skip("no BLAS library that threadpoolctl can see")
    seen = []
    real = cleanfid.fid_from_feats

    def spy(a, b):  # clean-fid's own FID, noting the thread counts it ran at
        seen.append(_blas_threads())
        return real(a, b)

    monkeypatch.setattr(cleanfid, "fid_from_feats", spy)
    with threadpool_limits(2, user_api="blas"):
        frechet(*_sets(8, 8, 32), resamples=3)
        assert set(map(tuple, seen)) == {(1,) * len(_blas_threads())}
        assert set(_blas_threads()) == {2}  # as it was
        seen.clear()
        frechet(*_sets(8, 8, SINGLE_THREAD_FID_DIM + 1), resamples=2)  # Inception-sized: every thread kept
        assert set(map(tuple, seen)) == {(2,) * len(_blas_threads())}
