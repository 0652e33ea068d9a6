"""Training replicates: own seeds and keys, reuse of trained replicates, pooling, and claims that must hold in all."""
from dataclasses import replace

import numpy as np
import pytest

from conftest import TINY
from flows.plan import Plan, model_specs
from flows.profiles import load_profile
from pd_eval.schema import MetricRow
from pd_core.state import StateDir
from pd_data.tasks import TRAINING_TASKS
from pd_eval.claims import claims_table, head_to_head, task_claims, verdict
from pd_eval.replicates import pool, pooled_interval, replicate_rows, spread_table
from pd_model.names import label, replicate_id, replicate_of
from test_e2e import _model_mtimes


def _row(model, task, metric, value, lo=None, hi=None, n=16):
    lo = value - 0.01 if lo is None else lo
    hi = value + 0.01 if hi is None else hi
    return MetricRow("", model, task, metric, value, lo, hi, n, "", "demo")


def test_replicate_ids_read_back_and_label():
    assert replicate_id("cn-ft_image-to-depth", 0) == "cn-ft_image-to-depth"
    assert replicate_of(replicate_id("cn-ft_image-to-depth", 2)) == ("cn-ft_image-to-depth", 2)
    assert replicate_of("prompt-diffusion") == ("prompt-diffusion", 0)
    assert label("cn-ft_image-to-depth@r2") == "cn-ft image->depth, replicate 2"


def test_each_replicate_has_its_own_seed_and_model_key_and_more_replicates_keep_the_first(tmp_path):
    three = load_profile("smoke", {**TINY, "train": {**TINY["train"], "replicates": 3}})
    specs = model_specs(three.train, TRAINING_TASKS, ())
    pd = [s for s in specs if s.kind == "prompt-diffusion"]
    assert [s.name for s in pd] == ["prompt-diffusion", "prompt-diffusion@r1", "prompt-diffusion@r2"]
    assert len({s.seed_offset for s in specs}) == len(specs)  # no two trainings share a seed
    assert sum(s.kind == "cn-ft" for s in specs) == 6  # baseline_replicates=1: the CN(FT) are trained once
    p3 = Plan.build(three, StateDir(tmp_path))
    keys3 = {s.name: p3.model_key(s) for s in p3.models}
    assert len(set(keys3.values())) == len(keys3)
    five = load_profile("smoke", {**TINY, "train": {**TINY["train"], "replicates": 5}})
    p5 = Plan.build(five, StateDir(tmp_path))
    keys5 = {s.name: p5.model_key(s) for s in p5.models}
    assert p5.key("train") != p3.key("train")  # the stage trains more models ...
    assert all(keys5[n] == k for n, k in keys3.items())  # ... and the ones both have are the same models
    other = load_profile("smoke", {**TINY, "train": {**TINY["train"], "replicates": 3, "learning_rate": 1e-3}})
    p_other = Plan.build(other, StateDir(tmp_path))
    assert not set(keys3.values()) & {p_other.model_key(s) for s in p_other.models}


def test_baseline_replicates_without_baselines_is_an_error():
    from flows.profiles import ConfigError

    with pytest.raises(ConfigError, match="baseline_replicates=2"):
        load_profile("smoke", {"train": {"baseline_steps_per_task": 0, "baseline_replicates": 2}})


def test_pooled_interval_covers_replicates_and_prompts():
    one = pooled_interval([0.2], [0.18], [0.22])
    assert one[0] == pytest.approx(0.18, abs=0.003) and one[1] == pytest.approx(0.22, abs=0.003)  # R = 1: the prompt interval
    tight = pooled_interval([0.2, 0.2, 0.2], [0.199] * 3, [0.201] * 3)
    spread = pooled_interval([0.1, 0.2, 0.3], [0.099, 0.199, 0.299], [0.101, 0.201, 0.301])
    assert spread[1] - spread[0] > 20 * (tight[1] - tight[0])  # replicates that disagree widen it
    assert spread[0] < 0.2 < spread[1] and spread[0] >= 0.1 and spread[1] <= 0.3
    assert pooled_interval([0.1, 0.3], [0.05, 0.25], [0.15, 0.35]) == pooled_interval([0.1, 0.3], [0.05, 0.25], [0.15, 0.35])


def test_pool_means_replicated_rows_and_passes_the_others_through():
    per = {0: [_row("prompt-diffusion", "image->depth", "rmse", 0.10), _row("baseline/mean-map", "image->depth", "rmse", 0.18)],
           1: [_row("prompt-diffusion", "image->depth", "rmse", 0.14)]}
    pooled = {(m.model_id, m.metric): m for m in pool(per)}
    assert pooled[("prompt-diffusion", "rmse")].value == pytest.approx(0.12)
    assert pooled[("prompt-diffusion", "rmse")].n == 32
    assert pooled[("baseline/mean-map", "rmse")] == per[0][1]
    reps = replicate_rows(per)
    assert sorted((r.model_id, r.replicate) for r in reps) == [("baseline/mean-map", 0), ("prompt-diffusion", 0),
                                                               ("prompt-diffusion", 1)]


def _world(pd_values: list[float], cn: float = 0.15, mean_map: float = 0.18):
    """Pooled and per-replicate rows (as dicts) of image->depth: PD replicates, one CN(FT), the baselines."""
    per = {r: [_row("prompt-diffusion", "image->depth", "rmse", v)] for r, v in enumerate(pd_values)}
    per[0] += [_row("cn-ft", "image->depth", "rmse", cn), _row("baseline/mean-map", "image->depth", "rmse", mean_map),
               _row("baseline/copy-example", "image->depth", "rmse", 0.3)]
    from dataclasses import asdict

    return [asdict(m) for m in pool(per)], [asdict(r) for r in replicate_rows(per)]


def test_a_claim_that_every_replicate_supports_is_made():
    rows, reps = _world([0.10, 0.11, 0.12])
    c = task_claims(rows, reps)[0]
    assert c.outcomes["prompt-diffusion"].beats and not c.outcomes["prompt-diffusion"].dissent
    assert head_to_head(rows, replicate_rows=reps)["image->depth"].beats
    assert "in all 3 replicates" in verdict(rows, reps)[0]


def test_a_replicate_that_disagrees_makes_no_claim_and_is_named():
    rows, reps = _world([0.10, 0.11, 0.20])  # pooled 0.137 beats both bars; replicate 2 loses to CN(FT) and the mean map
    o = task_claims(rows, reps)[0].outcomes["prompt-diffusion"]
    assert not o.beats and not o.loses and o.dissent == ((2, "loses to mean-map"),)
    assert task_claims(rows)[0].outcomes["prompt-diffusion"].beats  # pooled alone would have claimed it
    pair = head_to_head(rows, replicate_rows=reps)["image->depth"]
    assert not pair.beats and pair.dissent == ((2, "loses to cn-ft"),)
    lines = verdict(rows, reps)
    assert "beats CN(FT) on 0 of 1" in lines[0] and "replicates disagree on image->depth (no claim)" in lines[0]
    said = claims_table(rows, reps)[1][0][3]
    assert "PD: no claim, replicates disagree" in said and "replicate 2: loses to mean-map" in said


def test_spread_table_lists_every_replicate():
    _, reps = _world([0.10, 0.11, 0.12])
    names, body = spread_table(reps, {"image->depth": "rmse"})
    assert names[3:6] == ["replicate 0", "replicate 1", "replicate 2"]
    assert [r[0] for r in body] == ["prompt-diffusion"]  # CN(FT) and the baselines were not replicated
    assert body[0][6] == pytest.approx(0.11) and body[0][8] == pytest.approx(0.02)
    assert spread_table([r for r in reps if r["replicate"] == 0], {"image->depth": "rmse"}) == ([], [])


def test_replicated_benchmark_stores_each_replicate_and_reuses_trained_ones(prefect_engine, state_dir):
    from flows.stages import report_flow, train_flow
    from pd_eval.store import query

    over = {**TINY, "train": {**TINY["train"], "replicates": 2, "baseline_steps_per_task": 0, "oracles": False},
            "eval": {**TINY["eval"], "task_inference_queries": 1}}
    path = report_flow("smoke", over)
    plan = Plan.build(load_profile("smoke", over), StateDir.resolve())
    db = plan.state.db
    _, reps = query(db, "SELECT model_id, task, replicate, value FROM replicate_metrics WHERE eval_id = ? "
                        "AND metric = 'rmse' AND model_id = 'prompt-diffusion'", [plan.key("evaluate")])
    by = {}
    for m, t, r, v in reps:
        by.setdefault(t, {})[r] = v
    assert by and all(set(v) == {0, 1} for v in by.values())
    _, pooled = query(db, "SELECT task, value, n FROM metrics WHERE eval_id = ? AND metric = 'rmse' "
                          "AND model_id = 'prompt-diffusion'", [plan.key("evaluate")])
    for task, value, n in pooled:
        assert value == pytest.approx(np.mean(list(by[task].values())))
    _, spread = query(db, "SELECT replicates FROM replicate_spread WHERE model = 'prompt-diffusion'")
    assert spread and {s for (s,) in spread} == {2}
    _, samples = query(db, "SELECT DISTINCT model_id FROM samples WHERE eval_id = ?", [plan.key("evaluate")])
    assert {"prompt-diffusion", "prompt-diffusion@r1"} <= {m for (m,) in samples}
    text = open(path).read()
    assert "Training replicates" in text and "replicate 1" in text

    # A second run trains nothing; a third replicate trains that one and copies the two it has.
    before = _model_mtimes(plan.dir("train"))
    train_flow("smoke", over)
    assert _model_mtimes(plan.dir("train")) == before
    three = {**over, "train": {**over["train"], "replicates": 3}}
    summary = train_flow("smoke", three)
    got = {m["name"]: m for m in summary["models"]}
    assert got["prompt-diffusion"]["reused_from"] and got["prompt-diffusion@r1"]["reused_from"]
    assert got["prompt-diffusion@r2"]["reused_from"] is None
    old = plan.dir("train") / "prompt-diffusion" / "controlnet" / "diffusion_pytorch_model.safetensors"
    new = replace(plan, keys={**plan.keys, "train": Plan.build(load_profile("smoke", three), StateDir.resolve()).key("train")})
    assert (new.dir("train") / "prompt-diffusion" / "controlnet" / "diffusion_pytorch_model.safetensors").read_bytes() == old.read_bytes()


def test_a_retraining_round_refuses_replicates(prefect_engine, state_dir):
    from flows.profiles import ConfigError
    from flows.retrain import retrain_flow

    with pytest.raises(ConfigError, match="a retraining round trains one candidate"):
        retrain_flow("smoke", {**TINY, "train": {**TINY["train"], "replicates": 2}}, dataset="x")
