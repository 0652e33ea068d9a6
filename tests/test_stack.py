"""The user's path: `pd up` (server, pool, deployments, worker), `prefect deployment run ... --watch`,
`pd sql`, `pd down`, all real processes on a free local port."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stack(tmp_path):
    port = _free_port()
    # The scheduler looks every 2 s instead of 60: a paused cron that made runs would show within the test.
    env = {**os.environ, "PD_STATE_DIR": str(tmp_path / "state"), "PD_PREFECT_PORT": str(port),
           "PREFECT_HOME": str(tmp_path / "state" / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run([BIN / "pd", "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, up.stdout
    finally:
        subprocess.run([BIN / "pd", "down"], cwd=REPO, env=env, capture_output=True, timeout=60)


def _deploy_run(env, params: dict) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "prefect", "deployment", "run", "full-benchmark/smoke", "--params", json.dumps(params),
                           "--watch", "--watch-timeout", "600"], cwd=REPO, env=env, capture_output=True, text=True, timeout=700)


def _scheduled_retrains(env) -> list:
    out = subprocess.run([BIN / "prefect", "flow-run", "ls", "--flow-name", "retrain", "--state-type", "SCHEDULED",
                          "-o", "json"], env=env, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def test_deployment_runs_through_server_and_worker(stack):
    stack, up_out = stack
    ls = subprocess.run([BIN / "prefect", "deployment", "ls"], env=stack, capture_output=True, text=True, timeout=60)
    for name in ("full-benchmark/smoke", "full-benchmark/demo", "full-benchmark/paper", "train/demo", "report/demo",
                 "retrain/demo", "retrain/smoke", "watch-source/demo"):
        assert name in ls.stdout
    # Weekly retraining is registered paused, and `pd up` says so with the command that turns it on;
    # its event trigger is an automation there.
    assert ("weekly retraining: retrain/demo is registered (Mondays 03:00 UTC), schedule paused; "
            "`pd schedule on` turns it on") in up_out
    inspect = subprocess.run([BIN / "prefect", "deployment", "inspect", "retrain/demo"], env=stack, capture_output=True,
                             text=True, timeout=60)
    assert "0 3 * * 1" in inspect.stdout and "'active': False" in inspect.stdout.replace('"', "'")
    autos = subprocess.run([BIN / "prefect", "automation", "ls"], env=stack, capture_output=True, text=True, timeout=60)
    assert "pd.source.changed" in autos.stdout and "Run deployment" in autos.stdout

    # A scheduled run of the retrain deployment is picked up and executed by the worker.
    sched = subprocess.run([BIN / "prefect", "deployment", "run", "retrain/smoke", "--start-in", "2 seconds",
                            "--params", json.dumps({"overrides": TINY}), "--watch", "--watch-timeout", "600"],
                           cwd=REPO, env=stack, capture_output=True, text=True, timeout=700)
    assert sched.returncode == 0 and "Completed" in sched.stdout, sched.stdout[-2000:] + sched.stderr[-2000:]
    models = subprocess.run([BIN / "pd", "models"], env=stack, capture_output=True, text=True)
    assert "r0001" in models.stdout and "promoted" in models.stdout

    ok = _deploy_run(stack, {"profile": "smoke", "overrides": TINY})
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "Completed" in ok.stdout

    sql = subprocess.run([BIN / "pd", "sql", "SELECT count(*) AS n FROM metrics JOIN runs USING (eval_id)"], env=stack, capture_output=True, text=True)
    # Table 1's, the baselines', controllability, sensitivity and task-inference rows: the breakdown is in test_e2e.py
    assert sql.returncode == 0 and int(sql.stdout.split()[-1]) == 416
    res = subprocess.run([BIN / "pd", "results"], env=stack, capture_output=True, text=True)
    assert "prompt-diffusion" in res.stdout and "report:" in res.stdout

    # Typed parameters: the server refuses a profile that is not one, before any run exists.
    bad = _deploy_run(stack, {"profile": "nosuch"})
    assert bad.returncode != 0 and "nosuch" in bad.stdout + bad.stderr, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "Completed" not in bad.stdout and "nosuch" not in (Path(stack["PD_STATE_DIR"]) / "logs" / "worker.log").read_text()
    bad_stage = _deploy_run(stack, {"profile": "smoke", "force": ["trian"]})
    assert bad_stage.returncode != 0 and "trian" in bad_stage.stdout + bad_stage.stderr
    # One flow run at a time on the local pool: the others queue.
    pool = subprocess.run([BIN / "prefect", "work-pool", "inspect", "pd-local"], env=stack, capture_output=True, text=True, timeout=60)
    assert "concurrency_limit=1" in pool.stdout.replace(" ", "") or "'concurrency_limit':1" in pool.stdout.replace(" ", ""), pool.stdout

    # Minutes of scheduler loops later, the paused cron has made no run; `pd schedule on` resumes it and
    # the scheduler fills in the coming Mondays.
    assert _scheduled_retrains(stack) == []
    on = subprocess.run([BIN / "pd", "schedule", "on"], env=stack, capture_output=True, text=True, timeout=60)
    assert on.returncode == 0 and "retrain/demo: cron='0 3 * * 1'" in on.stdout and " on (schedule id" in on.stdout, on.stderr
    deadline = time.monotonic() + 30
    while not (runs := _scheduled_retrains(stack)) and time.monotonic() < deadline:
        time.sleep(1)
    assert runs and all(r["deployment_id"] == runs[0]["deployment_id"] for r in runs)

    # `pd up` again reuses the running server and worker, and keeps the schedule the user turned on.
    again = subprocess.run([BIN / "pd", "up"], cwd=REPO, env={k: v for k, v in stack.items() if k != "PREFECT_API_URL"},
                           capture_output=True, text=True, timeout=300)
    assert "already up" in again.stdout and "already running" in again.stdout
    assert "retrain/demo is registered (Mondays 03:00 UTC), schedule on; `pd schedule off` pauses it" in again.stdout
