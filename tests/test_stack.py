"""The user's path: `pd up` (server, pool, deployments, worker), `prefect deployment run ... --watch`,
`pd sql`, `pd down`, all real processes on a free local port."""
import json
import os
import socket
import subprocess
import sys
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
    env = {**os.environ, "PD_STATE_DIR": str(tmp_path / "state"), "PD_PREFECT_PORT": str(port),
           "PREFECT_HOME": str(tmp_path / "state" / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run([BIN / "pd", "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        subprocess.run([BIN / "pd", "down"], cwd=REPO, env=env, capture_output=True, timeout=60)


def _deploy_run(env, params: dict) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "prefect", "deployment", "run", "full-benchmark/smoke", "--params", json.dumps(params),
                           "--watch", "--watch-timeout", "600"], cwd=REPO, env=env, capture_output=True, text=True, timeout=700)


def test_deployment_runs_through_server_and_worker(stack):
    ls = subprocess.run([BIN / "prefect", "deployment", "ls"], env=stack, capture_output=True, text=True, timeout=60)
    for name in ("full-benchmark/smoke", "full-benchmark/demo", "full-benchmark/paper", "train/demo", "report/demo",
                 "retrain/demo", "retrain/smoke", "watch-source/demo"):
        assert name in ls.stdout
    # Weekly retraining is scheduled on the server, and its event trigger is an automation there.
    inspect = subprocess.run([BIN / "prefect", "deployment", "inspect", "retrain/demo"], env=stack, capture_output=True,
                             text=True, timeout=60)
    assert "0 3 * * 1" in inspect.stdout and "'active': True" in inspect.stdout.replace('"', "'")
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
    # FID + KID x 24, RMSE + SSIM + PSNR x 22 (baselines included) + 2 task-inference accuracies: the breakdown is in test_e2e.py
    assert sql.returncode == 0 and int(sql.stdout.split()[-1]) == 116
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

    # `pd up` again reuses the running server and worker.
    again = subprocess.run([BIN / "pd", "up"], cwd=REPO, env={k: v for k, v in stack.items() if k != "PREFECT_API_URL"},
                           capture_output=True, text=True, timeout=300)
    assert "already up" in again.stdout and "already running" in again.stdout
