"""Trivial baselines (copy-example on every task; copy-query and mean-map on image->map), and the
report's verdict against them."""
import numpy as np
import pytest

from pd_data.dataset import SplitData
from pd_data.tasks import get_task
from pd_eval.baselines import BASELINES, baseline_outputs, mean_map
from pd_eval.benchmark import baseline_rows
from pd_eval.config import EvalConfig
from pd_eval.claims import claims_table, task_claims, verdict

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels


def _split(n: int, seed: int) -> SplitData:
    rng = np.random.default_rng(seed)
    data = SplitData()
    for i in range(n):
        data.arrays[f"i{i}"] = {m: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for m in ("image", "depth")}
        data.captions[f"i{i}"] = "c"
    data.groups = {"g": sorted(data.arrays)}
    return data


def test_mean_map_is_the_per_pixel_train_mean_and_copy_query_is_the_query():
    train, test = _split(5, 0), _split(2, 1)
    expected = np.mean([a["depth"].astype(float) for a in train.arrays.values()], axis=0)
    assert np.allclose(mean_map(train, "depth"), expected)
    spec = get_task("image->depth")
    prompts = [test.prompt(spec, "i0", "i1"), test.prompt(spec, "i1", "i0")]
    assert np.array_equal(baseline_outputs("baseline/copy-query", spec, prompts, train),
                          np.stack([test.arrays["i1"]["image"], test.arrays["i0"]["image"]]))
    assert np.allclose(baseline_outputs("baseline/mean-map", spec, prompts, train)[1], expected)
    with pytest.raises(ValueError, match="no 'hed' maps"):
        mean_map(train, "hed")
    with pytest.raises(ValueError, match="image->map tasks only"):
        baseline_outputs("baseline/copy-query", get_task("depth->image"), prompts, train)
    # copy-example answers both directions with the example pair's target.
    assert np.array_equal(baseline_outputs("baseline/copy-example", spec, prompts, train),
                          np.stack([test.arrays["i0"]["depth"], test.arrays["i1"]["depth"]]))
    inverse = [test.prompt(get_task("depth->image"), "i0", "i1")]
    assert np.array_equal(baseline_outputs("baseline/copy-example", get_task("depth->image"), inverse, train)[0],
                          test.arrays["i0"]["image"])


def test_baseline_rows_score_every_task_with_an_interval(tmp_path):
    train, test = _split(6, 0), _split(4, 1)
    prompts = [{"task": t, "example_id": "i0", "query_id": f"i{k}", "prompt_id": f"{t}/{k}", "seed": k}
               for t in ("image->depth", "depth->image") for k in (1, 2, 3)]
    rows = baseline_rows(test, train, prompts, EvalConfig(bootstrap=50), tmp_path)
    assert sorted((r.model_id, r.task, r.metric) for r in rows) == sorted(
        [(b, "image->depth", m) for b in BASELINES for m in ("psnr", "rmse", "ssim")]
        + [(b, "depth->image", m) for b in ("baseline/copy-example", "baseline/mean-map")
           for m in ("fid", "kid", "psnr", "rmse", "ssim")])  # map->image: FID and the paired scores
    outs = {b: np.stack(o).astype(float) for b, o in {
        "baseline/copy-query": [test.arrays[f"i{k}"]["image"] for k in (1, 2, 3)],
        "baseline/copy-example": [test.arrays["i0"]["depth"]] * 3}.items()}
    tgts = np.stack([test.arrays[f"i{k}"]["depth"] for k in (1, 2, 3)]).astype(float)
    for b, o in outs.items():
        r = next(r for r in rows if r.model_id == b and r.metric == "rmse" and r.task == "image->depth")
        assert np.isclose(r.value, np.sqrt(np.mean(((o - tgts) / 255) ** 2)))
        assert r.ci_low <= r.value <= r.ci_high and r.n == 3
    fid = next(r for r in rows if r.metric == "fid")
    assert fid.n == 3 and fid.feature_extractor and fid.value > 0
    # The answers are saved like a model's samples (FID reads them from there).
    assert len(list((tmp_path / "samples" / "baseline_copy-example" / "depth-to-image").glob("*.png"))) == 3


def _r(model, task, value, hi=None, metric="rmse"):
    return {"model_id": model, "task": task, "metric": metric, "value": value, "ci_low": value, "ci_high": hi or value}


def test_baseline_claim_is_computed_from_the_numbers():
    rows = [_r("baseline/copy-query", "image->hed", 0.5), _r("baseline/mean-map", "image->hed", 0.3),
            _r("baseline/copy-example", "image->hed", 0.45),
            _r("prompt-diffusion", "image->hed", 0.2, 0.25), _r("cn-ft", "image->hed", 0.4)]
    [claim] = task_claims(rows)
    assert claim.best == ("mean-map", 0.3) and list(claim.outcomes) == ["prompt-diffusion", "cn-ft"]
    pd, cn = claim.outcomes["prompt-diffusion"], claim.outcomes["cn-ft"]
    assert pd.beats and pd.clear and not cn.beats and cn.lost_to == ("mean-map",)
    [(task, cell, best, said)] = claims_table(rows)[1]
    assert (task, cell, best) == ("image->hed (RMSE)", "0.200 [0.200, 0.250]", "mean-map 0.300")
    assert said == "PD beats all (interval clear); CN(FT) 0.400 loses to mean-map"
    assert task_claims(rows[3:]) == []  # no baselines, no claim


def test_copy_example_enters_the_claims_in_both_directions():
    rows = [_r("baseline/copy-query", "image->depth", 0.3), _r("baseline/mean-map", "image->depth", 0.2),
            _r("baseline/copy-example", "image->depth", 0.08), _r("prompt-diffusion", "image->depth", 0.15, 0.17),
            _r("baseline/copy-example", "depth->image", 0.05, metric="fid"), _r("prompt-diffusion", "depth->image", 0.3, metric="fid"),
            _r("cn-ft", "depth->image", 0.04, 0.06, metric="fid")]
    forward, inverse = claims_table(rows)[1]  # image->map first, as in Table 1
    assert forward[0] == "image->depth (RMSE)" and forward[3] == "PD loses to copy-example"
    assert inverse[:3] == ("depth->image (FID)", "0.300 [0.300, 0.300]", "copy-example 0.050")
    assert inverse[3] == "PD loses to copy-example; CN(FT) 0.040 beats all (interval reaches copy-example)"


def test_the_verdict_counts_what_was_scored_and_no_more():
    rows = [_r("baseline/copy-query", "image->hed", 0.5), _r("baseline/mean-map", "image->hed", 0.3),
            _r("baseline/copy-example", "image->hed", 0.45),
            _r("prompt-diffusion", "image->hed", 0.2, 0.25), _r("cn-ft", "image->hed", 0.4),
            _r("baseline/copy-example", "image->canny", 0.1), _r("prompt-diffusion", "image->canny", 0.3)]
    assert verdict(rows) == [
        "Verdict: Prompt Diffusion beats CN(FT) on 1 of 1 trained tasks (image->hed; its 95% interval clears CN(FT)'s value on 1).",
        "Beats every trivial baseline: Prompt Diffusion on 1 of 1 image->map tasks (interval clear on 1); "
        "CN(FT) on 0 of 1 image->map tasks (interval clear on 0).",  # no map->image task was scored: none counted
        "Unseen tasks, zero-shot: Prompt Diffusion beats every trivial baseline on 0 of 1."]
    assert verdict(rows[:3])[0].startswith("Verdict: no model was scored")
