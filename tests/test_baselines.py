"""Trivial baselines of the image->map tasks, and the report's verdict against them."""
import numpy as np
import pytest

from pd_data.dataset import SplitData
from pd_data.tasks import get_task
from pd_eval.baselines import BASELINES, baseline_outputs, mean_map
from pd_eval.benchmark import baseline_rows
from pd_eval.config import EvalConfig
from pd_eval.report import baseline_statements


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


def test_baseline_rows_score_every_image_to_map_task_with_an_interval():
    train, test = _split(6, 0), _split(4, 1)
    prompts = [{"task": t, "example_id": "i0", "query_id": f"i{k}"} for t in ("image->depth", "depth->image") for k in (1, 2, 3)]
    rows = baseline_rows(test, train, prompts, EvalConfig(bootstrap=50))
    assert sorted((r["model_id"], r["task"], r["metric"]) for r in rows) == [
        (b, "image->depth", m) for b in BASELINES for m in ("psnr", "rmse", "ssim")]
    copy = next(r for r in rows if r["model_id"] == "baseline/copy-query" and r["metric"] == "rmse")
    outs = np.stack([test.arrays[f"i{k}"]["image"] for k in (1, 2, 3)]).astype(float)
    tgts = np.stack([test.arrays[f"i{k}"]["depth"] for k in (1, 2, 3)]).astype(float)
    assert np.isclose(copy["value"], np.sqrt(np.mean(((outs - tgts) / 255) ** 2)))
    assert copy["ci_low"] <= copy["value"] <= copy["ci_high"] and copy["n"] == 3


def _r(model, task, value, hi=None):
    return {"model_id": model, "task": task, "metric": "rmse", "value": value, "ci_low": value, "ci_high": hi or value}


def test_baseline_statement_is_computed_from_the_numbers():
    rows = [_r("baseline/copy-query", "image->hed", 0.5), _r("baseline/mean-map", "image->hed", 0.3),
            _r("prompt-diffusion", "image->hed", 0.2, 0.25), _r("cn-ft", "image->hed", 0.4)]
    [line] = baseline_statements(rows)
    assert "Prompt Diffusion beats both baselines with 0.200 (its 95% interval lies below both)" in line
    assert "CN(FT) does NOT beat mean-map (0.400)" in line
    assert baseline_statements(rows[2:]) == []  # no baselines, no claim
