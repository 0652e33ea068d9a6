"""The local Prefect stack: a server bound to 127.0.0.1 and a process worker, with pid and log files
in the state directory. `up` reuses whatever is already running; `down` stops what `up` started.

`prefect server start --background` dies at the first error it logs (its stderr pipe is closed), so
the server runs in the foreground of its own session with its output in a log file.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pd_core.state import StateDir

HOST, PORT = "127.0.0.1", int(os.environ.get("PD_PREFECT_PORT", "4200"))
API_URL = f"http://{HOST}:{PORT}/api"
POOL = "pd-local"
# The deployment of prefect.yaml with a cron, registered paused (`pd schedule on` resumes it).
WEEKLY = "retrain/demo"


def stack_env(state: StateDir) -> dict[str, str]:
    """Environment for every Prefect process of the stack: home, API and database inside the state dir."""
    state.prefect_home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PD_STATE_DIR": str(state.root), "PREFECT_HOME": str(state.prefect_home),
            "PREFECT_API_URL": API_URL, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(PORT),
            "PREFECT_LOGGING_COLORS": "false", "HF_HUB_OFFLINE": "1",
            "MPLCONFIGDIR": str(state.root / "cache" / "matplotlib"), "PD_PROJECT_DIR": str(Path.cwd())}


def healthy(timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{API_URL}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _spawn(cmd: list[str], name: str, state: StateDir) -> int:
    logs = state.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=stack_env(state), cwd=Path.cwd(), start_new_session=True)
    (state.root / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def pool_concurrency() -> int:
    """Flow runs the local pool runs at once: 1 (`PD_POOL_CONCURRENCY`). A cron round, an event-triggered
    round and a manual run queue instead of sharing the cores: two trainings side by side on 2 cores each
    take far more than twice as long."""
    text = os.environ.get("PD_POOL_CONCURRENCY", "1")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"PD_POOL_CONCURRENCY={text!r}; it must be a whole number of at least 1")
    return int(text)


def _prefect(*args: str, state: StateDir) -> None:
    exe = Path(sys.executable).with_name("prefect")
    subprocess.run([str(exe), *args], env=stack_env(state), check=True, stdout=subprocess.DEVNULL)


def set_schedules(deployment: str, active: bool | None = None, api_url: str = API_URL) -> list:
    """The schedules of `deployment` (FLOW/DEPLOYMENT) on the server, after resuming (`active=True`)
    or pausing (`False`) them all; `None` changes nothing. By name, because Prefect's own
    `prefect deployment schedule resume` needs each schedule's id."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ValueError(f"no deployment {deployment!r} on {api_url}; `pd up` registers those of prefect.yaml "
                             f"(`prefect deployment ls` lists them)") from None
        for s in dep.schedules:
            if active is not None and s.active != active:
                client.update_deployment_schedule(dep.id, s.id, active=active)
        return client.read_deployment_schedules(dep.id)


def describe_weekly(api_url: str = API_URL) -> str:
    """One line: whether the weekly retraining runs, and the command that changes it."""
    state = "on" if any(s.active for s in set_schedules(WEEKLY, api_url=api_url)) else "paused"
    turn = "`pd schedule off` pauses it" if state == "on" else "`pd schedule on` turns it on"
    return f"weekly retraining: {WEEKLY} is registered (Mondays 03:00 UTC), schedule {state}; {turn}"


def up(state: StateDir, wait_s: float = 90.0) -> None:
    """Server (if not healthy), work pool, deployments of prefect.yaml, worker (if not running)."""
    exe = str(Path(sys.executable).with_name("prefect"))
    if healthy():
        print(f"prefect server: already up at {API_URL}")
    else:
        pid = _spawn([exe, "server", "start", "--host", HOST, "--port", str(PORT)], "server", state)
        print(f"prefect server: starting (pid {pid}, log {state.root / 'logs/server.log'})", flush=True)
        deadline = time.monotonic() + wait_s
        while not healthy():
            if time.monotonic() > deadline or _alive(state.root / "server.pid") is None:
                raise RuntimeError(f"the Prefect server did not become healthy; see {state.root / 'logs/server.log'}")
            time.sleep(1)
        print(f"prefect server: healthy at {API_URL}")
    _prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", state=state)
    limit = pool_concurrency()
    _prefect("work-pool", "set-concurrency-limit", POOL, str(limit), state=state)
    # `deploy` re-registers the weekly schedule as prefect.yaml has it (paused): one turned on with
    # `pd schedule on` stays on across `pd up` / `make benchmark`.
    try:
        weekly_on = any(s.active for s in set_schedules(WEEKLY))
    except ValueError:  # not registered yet
        weekly_on = False
    _prefect("--no-prompt", "deploy", "--all", state=state)
    if weekly_on:
        set_schedules(WEEKLY, True)
    print(f"deployments of prefect.yaml registered on pool {POOL!r} (at most {limit} flow run(s) at once; "
          f"the rest wait in the queue, PD_POOL_CONCURRENCY sets it)")
    print(describe_weekly())
    env_file = state.root / "env.sh"
    env_file.write_text(f"export PD_STATE_DIR={state.root}\nexport PREFECT_HOME={state.prefect_home}\n"
                        f"export PREFECT_API_URL={API_URL}\n")
    print(f"in another shell, `source {env_file}` to talk to this server")
    if (pid := _alive(state.root / "worker.pid")) is not None:
        print(f"prefect worker: already running (pid {pid})")
    else:
        pid = _spawn([exe, "worker", "start", "--pool", POOL, "--type", "process"], "worker", state)
        print(f"prefect worker: started (pid {pid}, log {state.root / 'logs/worker.log'})")


def down(state: StateDir) -> None:
    for name in ("worker", "server"):
        pidfile = state.root / f"{name}.pid"
        pid = _alive(pidfile)
        if pid is None:
            print(f"{name}: not running")
        else:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if _alive(pidfile) is None:
                    break
                time.sleep(0.1)
            print(f"{name}: stopped (pid {pid})")
        pidfile.unlink(missing_ok=True)
