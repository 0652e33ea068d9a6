"""Example sensitivity and paired fidelity: the same queries and seeds with the pair zeroed and with
another task's pair, scored as paired differences; map->image outputs scored against the query's own
true image."""
import numpy as np
import pytest

from conftest import live_controlnet
from pd_data.config import PromptConfig
from pd_data.dataset import load_split
from pd_data.prompts import materialise_prompts
from pd_data.tasks import TRAINING_TASKS, UNSEEN_TASKS, get_task, other_pair_task
from pd_eval.benchmark import (EMPTY_PAIR, OTHER_PAIR, evaluation_prompts, items, models_under_test, requests,
                               sensitivity_rows, slug)
from pd_eval.config import EvalConfig
from pd_eval.evaluate import Split, evaluate_folders
from pd_eval.generation import Request, _prompt, paths, save_png
from pd_model.base import load_base
from pd_model.pipeline import save_trained
from pd_model.train import build_controlnet

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

TASKS = ("image->depth", "image->hed", "depth->image", "hed->image")


def test_another_tasks_pair_keeps_the_direction_and_avoids_an_unseen_tasks_nearest():
    assert [other_pair_task(t) for t in ("image->depth", "image->hed", "image->seg")] == \
        ["image->hed", "image->seg", "image->depth"]
    assert [other_pair_task(t) for t in ("depth->image", "hed->image", "seg->image")] == \
        ["hed->image", "seg->image", "depth->image"]
    for t in UNSEEN_TASKS:  # another trained task of the same direction, not the one it resembles
        shown = get_task(other_pair_task(t))
        assert shown.trained and (shown.source == "image") == (get_task(t).source == "image")
        assert shown.name != get_task(t).nearest
    assert other_pair_task("image->depth", ("image->depth", "depth->image")) is None  # no other forward task trained


def test_sensitivity_adds_both_conditions_on_every_task_and_only_when_asked():
    nets = {"pd": ("prompt-diffusion", TRAINING_TASKS)}
    with_it = {m.model_id: m for m in models_under_test(nets, UNSEEN_TASKS, sensitivity=True)}
    assert set(with_it[EMPTY_PAIR].tasks) == set(with_it[OTHER_PAIR].tasks) == set(TRAINING_TASKS + UNSEEN_TASKS)
    assert with_it[EMPTY_PAIR].empty_pair and with_it[OTHER_PAIR].other_pair and not with_it[OTHER_PAIR].empty_pair
    without = {m.model_id: m for m in models_under_test(nets, UNSEEN_TASKS)}
    assert set(without[EMPTY_PAIR].tasks) == set(UNSEEN_TASKS) and OTHER_PAIR not in without


@pytest.fixture(scope="module")
def world(train_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("sens")
    base = load_base(train_world / "base").freeze()
    net = live_controlnet(build_controlnet(base, "prompt-diffusion"))  # so that the pair changes the output
    save_trained(root / "pd", net, base, str(train_world / "base"), "prompt-diffusion", TASKS, False)
    data = load_split(train_world / "img", train_world / "ann", "train")
    materialise_prompts(data, TASKS, PromptConfig(per_task=4, split="train"), root / "prompts.parquet")
    return {"root": root, "data": data, "tw": train_world}


def test_the_other_pair_shows_the_other_tasks_maps_of_the_same_example_and_keeps_the_query_and_text(world):
    cfg = EvalConfig(sensitivity_per_task=2)
    prompts = evaluation_prompts(world["root"] / "prompts.parquet", cfg)
    reqs = requests(models_under_test({"pd": ("prompt-diffusion", TASKS)}, (), sensitivity=True), prompts, cfg)
    other = next(r for r in reqs if r.model_id == OTHER_PAIR and r.task == "image->depth")
    assert len(other.items) == 2  # the first sensitivity_per_task prompts of a trained task
    it = other.items[0]
    assert it.pair_task == "image->hed"
    own, shown = world["data"].prompt(get_task("image->depth"), it.example_id, it.query_id), _prompt(world["data"], it, False)
    example = world["data"].arrays[it.example_id]
    assert np.array_equal(shown.example_target, example["hed"]) and np.array_equal(shown.example_source, example["image"])
    assert np.array_equal(shown.query, own.query) and np.array_equal(shown.target, own.target) and shown.text == own.text


def _write(out, r: Request, outputs):
    for p, a in zip(paths(out, r), outputs):
        save_png(p, a)


def test_paired_differences_are_zero_when_the_pair_changes_nothing_and_signed_when_it_helps(world, tmp_path):
    cfg = EvalConfig(bootstrap=50)
    data, spec = world["data"], get_task("image->depth")
    rows = [r for r in evaluation_prompts(world["root"] / "prompts.parquet", cfg) if r["task"] == spec.name]
    its = items(rows)
    truth = np.stack([data.prompt(spec, it.example_id, it.query_id).target for it in its])
    req = lambda model: Request(model_id=model, checkpoint="pd", task=spec.name, guidance=1.0,  # noqa: E731
                                folder=f"samples/{slug(model)}/{slug(spec.name)}", items=its)
    own, zeroed, other = req("prompt-diffusion"), req(EMPTY_PAIR), req(OTHER_PAIR)
    _write(tmp_path, own, truth)                                  # its own pair: the true maps
    _write(tmp_path, zeroed, truth)                               # the pair zeroed: the same answers
    _write(tmp_path, other, np.full_like(truth, 128))             # another task's pair: worse answers
    got = {(r.model_id, r.metric): r for r in sensitivity_rows(tmp_path, [own, zeroed, other], data, cfg)}
    assert got[(EMPTY_PAIR, "output_change")].value == 0 and got[(EMPTY_PAIR, "paired_diff_mse")].value == 0
    worse = got[(OTHER_PAIR, "paired_diff_mse")]
    assert worse.value > 0 and worse.ci_low > 0 and worse.n == len(its)  # the own pair does better, beyond the interval
    assert got[(OTHER_PAIR, "output_change")].value > 0


def test_an_evaluation_scores_sensitivity_and_paired_fidelity(world, tmp_path):
    cfg = EvalConfig(steps=2, bootstrap=20, sensitivity_per_task=2, task_inference_queries=0)
    where = Split(world["tw"] / "img", world["tw"] / "ann", "train", world["root"] / "prompts.parquet", baselines=False)
    result = evaluate_folders(world["tw"] / "base", {"pd": world["root"] / "pd"}, (), where, cfg, tmp_path / "ev")
    by = {(r.model_id, r.task, r.metric): r for r in result.metrics}
    for task in TASKS:
        for cond in (EMPTY_PAIR, OTHER_PAIR):
            assert by[(cond, task, "paired_diff_mse")].n == 2
            assert by[(cond, task, "output_change")].value > 0, (cond, task)  # a live ControlNet reads its pair
    for task in ("depth->image", "hed->image"):  # paired fidelity beside FID
        assert {"fid", "kid", "rmse", "ssim", "psnr"} <= {m for (mid, t, m) in by if mid == "prompt-diffusion" and t == task}


def test_controllability_reads_outputs_back_with_the_re_annotators_id_and_scores_the_ceiling(world, tmp_path):
    from pd_data.config import DataConfig
    from pd_eval.reannotate import READER, READER_MEAN_MAP, TRUE_IMAGE

    cfg = EvalConfig(steps=2, bootstrap=20, sensitivity_per_task=0, task_inference_queries=0, reader_steps=30)
    where = Split(world["tw"] / "img", world["tw"] / "ann", "train", world["root"] / "prompts.parquet", baselines=True,
                  annotators=DataConfig().annotators)
    cache = tmp_path / "cache" / "reference-features"
    result = evaluate_folders(world["tw"] / "base", {"pd": world["root"] / "pd"}, (), where, cfg, tmp_path / "ev", cache=cache)
    by = {(r.model_id, r.task, r.metric): r for r in result.metrics}
    for model in ("prompt-diffusion", "baseline/copy-example", "baseline/mean-map", TRUE_IMAGE):
        assert (model, "depth->image", "ctrl_rmse") in by and (model, "hed->image", "ctrl_ssim") in by, model
    ids = {r.feature_extractor for r in result.metrics if r.metric.startswith("ctrl_")}
    assert len(ids) == 1 and next(iter(ids)).startswith("demo-reader-v1@")  # every row names its re-annotator
    assert {(READER, "read:depth", "ctrl_rmse"), (READER_MEAN_MAP, "read:depth", "ctrl_rmse"),
            (READER, "read:depth", "informative")} <= set(by)
    assert len(list((cache.parent / "readers").glob("*/DONE"))) == 1  # trained once, cached by its data
    again = evaluate_folders(world["tw"] / "base", {"pd": world["root"] / "pd"}, (), where, cfg, tmp_path / "ev", cache=cache)
    assert {r.feature_extractor for r in again.metrics if r.metric.startswith("ctrl_")} == ids  # the cached reader
