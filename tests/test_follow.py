"""`pd follow` against a real server and worker (`pd up` on a free port): a run's progress lines and
task states in the terminal, never Prefect's event stream; a failed run's error and log path, exit 1.
The same runs show the names a user reads in the UI: task runs, artifact keys, deployment descriptions."""
import json
import os
import subprocess
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from test_stack import BIN, REPO, _free_port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("follow")
    env = {**os.environ, "PD_STATE_DIR": str(root / "state"), "PD_PREFECT_PORT": str(_free_port()),
           "PREFECT_HOME": str(root / "state" / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # `pd follow` finds the server `pd up` started by itself
    up = subprocess.run([BIN / "pd", "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        subprocess.run([BIN / "pd", "down"], cwd=REPO, env=env, capture_output=True, timeout=60)


def _follow(env, overrides: dict) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "pd", "follow", "full-benchmark/smoke", "--params", json.dumps({"overrides": overrides})],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@contextmanager
def _client(env):
    """A client of the stack's server (this process's settings were read at import: set them, not the environment)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{env['PD_PREFECT_PORT']}/api"}), \
            get_client(sync_client=True) as client:
        yield client


def _run_id(out: str) -> str:
    return out.splitlines()[0].split("(")[1].split(")")[0]


def test_follow_prints_every_stages_progress_and_the_names_a_user_reads(served):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    grids = {**TINY, "train": {**TINY["train"], "validate_every": 2}}  # two grids per model: steps 2 and 4
    run = _follow(served, grids)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    # A progress line of every stage, as to_run_log wrote it (done/total, rate; loss while training).
    for label in ("ingest shards: 1/1 shards", "annotate shards: 1/1 shards", "train base: 8/8 steps",
                  "train prompt-diffusion: 4/4 steps", "train cn-ft image->depth: 2/2 steps",
                  "evaluate: generated samples:", "evaluate: metrics:"):
        assert any(label in line for line in out.splitlines()), (label, out[-3000:])
    assert "loss" in out and "ETA" in out and "steps/s" in out
    for state in ("train: Running", "train cn-ft image->depth: Completed", "evaluate: Completed"):  # a poll every 2 s may miss a short state
        assert state in out, state
    assert "prefect.artifact" not in out and "prefect.task-run" not in out  # no event stream
    assert out.splitlines()[-1].startswith("full-benchmark/smoke: Completed")

    run_id = _run_id(out)
    with _client(served) as client:
        names = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))}
        artifacts = [a for a in client.read_artifacts() if str(a.flow_run_id) == run_id]
        deployments = {(client.read_flow(d.flow_id).name, d.name): d.description for d in client.read_deployments()}
    # Task runs named as a user says them, not "train-controlnet-976".
    assert {"ingest", "train", "evaluate", "ingest shard 0", "annotate shard 0", "train base", "train prompt-diffusion",
            "train cn-ft image->depth", "train cn-ft-oracle canny->image", "build report"} <= names, names
    assert not [n for n in names if "_" in n], names  # no folder spelling of a model id
    # One artifact key per thing: a validation card per model and step; the grid is a picture, not base64 text.
    counts = Counter(a.key for a in artifacts)
    assert counts and set(counts.values()) == {1}, counts
    cards = {a.key: a for a in artifacts if a.key.startswith("validation-")}
    assert {"validation-prompt-diffusion-step-2", "validation-prompt-diffusion-step-4",
            "validation-cn-ft-image-to-depth-step-2"} <= set(cards), sorted(cards)
    card = cards["validation-cn-ft-image-to-depth-step-2"]
    assert card.type == "markdown" and "![cn-ft image->depth, step 2](data:image/png;base64," in card.data
    assert card.description == "Validation grid of cn-ft image->depth at step 2"
    # Every deployment of prefect.yaml is registered with its description.
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    for d in spec:
        flow_name = {"full_benchmark": "full-benchmark", "ingest_flow": "ingest", "annotate_flow": "annotate",
                     "train_flow": "train", "evaluate_flow": "evaluate", "report_flow": "report",
                     "retrain_flow": "retrain", "watch_source_flow": "watch-source"}[d["entrypoint"].split(":")[1]]
        assert deployments[(flow_name, d["name"])] == d["description"].strip(), (flow_name, d["name"])


def test_follow_of_a_failing_run_prints_the_error_and_the_log_and_exits_1(served):
    # A learning rate no training survives: the base's loss is NaN at its second step, and the stage raises.
    run = _follow(served, {**TINY, "base": {**TINY["base"], "learning_rate": 1e30}})
    out = run.stdout
    assert run.returncode == 1, out[-3000:] + run.stderr[-3000:]
    assert "train base: Failed" in out
    assert "train base, base: Task run encountered an exception FloatingPointError: base: loss is nan" in out
    log = Path(served["PD_STATE_DIR"]) / "logs" / "worker.log"
    assert f"full log: {log} (flow run {_run_id(out)})" in out and log.exists()
