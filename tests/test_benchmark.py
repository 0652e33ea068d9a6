"""The benchmark's generation: it honours the evaluation config, gives the same PNGs on one or two
processes, resumes a killed run without computing a sample twice, and scores from the files."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import live_controlnet
from pd_data.config import PromptConfig
from pd_data.dataset import load_split
from pd_data.prompts import materialise_prompts
from pd_data.tasks import get_task
from pd_eval.benchmark import evaluation_prompts, models_under_test, requests
from pd_eval.config import EvalConfig
from pd_eval.evaluate import Split, evaluate_folders
from pd_eval.generation import GenerationJob, cpu_threads, generate_shard, paths, run_generation
from pd_model.base import load_base
from pd_model.pipeline import save_trained
from pd_model.config import Sampler
from pd_model.sampling import generate
from pd_model.train import build_controlnet

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

TASKS = ("image->depth", "depth->image")


@pytest.fixture(scope="module")
def world(train_world, tmp_path_factory):
    """A live Prompt Diffusion model folder and materialised prompts on the tiny train split."""
    root = tmp_path_factory.mktemp("bench")
    base = load_base(train_world / "base").freeze()
    net = live_controlnet(build_controlnet(base, "prompt-diffusion"))  # so that the example pair changes the output
    save_trained(root / "pd", net, base, str(train_world / "base"), "prompt-diffusion", TASKS, False)
    data = load_split(train_world / "img", train_world / "ann", "train")
    materialise_prompts(data, TASKS, PromptConfig(per_task=5, split="train"), root / "prompts.parquet")
    return {"root": root, "base": base, "net": net, "data": data, "tw": train_world}


def _job(world, cfg: EvalConfig, out, tasks=TASKS) -> GenerationJob:
    prompts = evaluation_prompts(world["root"] / "prompts.parquet", cfg)
    reqs = requests(models_under_test({"pd": ("prompt-diffusion", tasks)}, ()), prompts, cfg)
    tw = world["tw"]
    return GenerationJob(base=str(tw / "base"), models={"pd": str(world["root"] / "pd")}, images=str(tw / "img"),
                         annotations=str(tw / "ann"), split="train", cfg=cfg, out=str(out), requests=reqs)


def _pngs(job: GenerationJob) -> dict[str, np.ndarray]:
    return {str(p.relative_to(job.out)): np.asarray(Image.open(p)) for r in job.requests for p in paths(job.out, r)}


def _direct(world, cfg: EvalConfig, task: str, guidance: float, **kw) -> np.ndarray:
    rows = [r for r in evaluation_prompts(world["root"] / "prompts.parquet", cfg) if r["task"] == task]
    built = [world["data"].prompt(get_task(task), r["example_id"], r["query_id"]) for r in rows]
    with cpu_threads(cfg.threads):  # as generation runs: on a CPU the thread count moves float sums
        return generate(world["base"], world["net"], built, [r["seed"] for r in rows],
                        Sampler(steps=cfg.steps, guidance_scale=guidance, **kw))


def test_generation_samples_with_the_configured_pair_and_map_guidance(world, tmp_path):
    for pair in (3.0, None):
        cfg = EvalConfig(steps=2, bootstrap=0, guidance_scale=3.0, map_guidance_scale=1.0, pair_guidance_scale=pair)
        job = _job(world, cfg, tmp_path / f"pg-{pair}")
        assert generate_shard(job) == 10
        for r in job.requests:  # image->map at the map guidance, map->image at the text guidance
            saved = np.stack([np.asarray(Image.open(p)) for p in paths(job.out, r)])
            guidance = 1.0 if r.task == "image->depth" else 3.0
            assert np.array_equal(saved, _direct(world, cfg, r.task, guidance, pair_guidance_scale=pair)), (pair, r.task)


def test_one_and_two_processes_write_identical_pngs(world, tmp_path):
    cfg = EvalConfig(steps=2, bootstrap=0, batch_size=2)
    one, two = _job(world, cfg, tmp_path / "one"), _job(world, cfg, tmp_path / "two")
    seen = []
    assert run_generation(one, 1, seen.append) == 10 and sum(seen) == 10
    assert run_generation(two, 2) == 10  # torchrun, two CPU processes, every other batch each
    a, b = _pngs(one), _pngs(two)
    assert len(a) == 10 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert run_generation(two, 2) == 0  # all on disk: nothing recomputed


def test_a_killed_evaluation_resumes_without_computing_a_sample_twice(world, tmp_path):
    cfg = EvalConfig(steps=30, bootstrap=20, batch_size=1, sensitivity_per_task=0)  # the killed job has no study
    where = Split(world["tw"] / "img", world["tw"] / "ann", "train", world["root"] / "prompts.parquet", baselines=False)
    folders = {"pd": world["root"] / "pd"}
    job = _job(world, cfg, tmp_path / "killed")
    path = tmp_path / "job.json"
    path.write_text(job.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "pd_eval.generation", str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    files = [p for r in job.requests for p in paths(job.out, r)]
    deadline = time.time() + 120
    while sum(p.exists() for p in files) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in files if p.exists()}
    assert 3 <= len(before) < len(files), "the kill came too late to test resuming"

    resumed = evaluate_folders(world["tw"] / "base", folders, (), where, cfg, tmp_path / "killed", task_inference=False)
    assert (resumed.computed, resumed.total) == (len(files) - len(before), len(files))  # each sample computed once
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the samples on disk were kept, not rewritten
    whole = evaluate_folders(world["tw"] / "base", folders, (), where, cfg, tmp_path / "whole", task_inference=False)
    assert whole.computed == len(files)
    key = lambda r: (r.model_id, r.task, r.metric)  # noqa: E731
    assert sorted((key(r), r.value, r.ci_low, r.ci_high) for r in resumed.metrics) == \
        sorted((key(r), r.value, r.ci_low, r.ci_high) for r in whole.metrics)
    assert {r.metric for r in whole.metrics} == {"rmse", "ssim", "psnr", "fid", "kid"}


def test_a_broken_real_image_of_an_older_run_is_rewritten_and_reference_features_are_cached(world, tmp_path):
    cfg = EvalConfig(steps=2, bootstrap=0)
    where = Split(world["tw"] / "img", world["tw"] / "ann", "train", world["root"] / "prompts.parquet", baselines=False)
    out, cache = tmp_path / "eval", tmp_path / "cache"
    broken = out / "real" / "depth-to-image"
    broken.mkdir(parents=True)
    rows = [r for r in evaluation_prompts(world["root"] / "prompts.parquet", cfg) if r["task"] == "depth->image"]
    (broken / f"{rows[0]['prompt_id'].split('/')[-1]}.png").write_bytes(b"")  # a kill during an in-place write
    a = evaluate_folders(world["tw"] / "base", {"pd": world["root"] / "pd"}, (), where, cfg, out, task_inference=False,
                         cache=cache)
    assert len(list(cache.glob("*.npy"))) == 1  # one map->image task: one reference set
    stamp = next(cache.glob("*.npy")).stat().st_mtime_ns
    b = evaluate_folders(world["tw"] / "base", {"pd": world["root"] / "pd"}, (), where, cfg, tmp_path / "again",
                         task_inference=False, cache=cache)
    assert next(cache.glob("*.npy")).stat().st_mtime_ns == stamp  # read, not recomputed
    assert [(r.metric, r.value) for r in a.metrics] == [(r.metric, r.value) for r in b.metrics]


def test_the_process_count_is_not_part_of_the_evaluation_key_but_threads_and_batch_are(tmp_path):
    from flows.plan import Plan
    from flows.profiles import load_profile
    from pd_core.state import StateDir
    from pd_eval.generation import check_devices

    state = StateDir.resolve(tmp_path)
    key = lambda **ev: Plan.build(load_profile("smoke", {"eval": ev}), state).key("evaluate")  # noqa: E731
    assert key(processes=4) == key() != key(threads=2) != key(batch_size=3)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="eval.device='cuda' but no CUDA device is visible"):
            check_devices(EvalConfig(device="cuda"))
