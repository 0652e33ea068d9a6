"""How `pd` runs a flow in its own process: the state directory's environment set before Prefect is
imported, and SIGTERM or Ctrl-C ending the flow together with every process it started."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def prepare_env() -> "StateDir":  # noqa: F821
    """Prefect's home inside the state directory, analytics off; must run before Prefect is imported."""
    from pd_core.state import StateDir

    state = StateDir.resolve()
    state.require_writable()  # one line, not Prefect's tracebacks, when it cannot be written
    os.environ.setdefault("PREFECT_HOME", str(state.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLCONFIGDIR", str(state.root / "cache" / "matplotlib"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return state


class Ended(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, as Ctrl-C raises KeyboardInterrupt."""


def end_on_sigterm() -> None:
    """SIGTERM ends this process as Ctrl-C does: the flow unwinds (Prefect marks its run crashed) and the
    exit handlers run, Prefect's stop of its temporary server among them. By default SIGTERM kills this
    process alone, and that server's uvicorn process lives on, orphaned."""
    import signal

    def ended(signum, frame):
        raise Ended(f"signal {signum}")

    signal.signal(signal.SIGTERM, ended)


def stop_children(timeout: float = 5.0) -> list[int]:
    """Stop every process this one started that still runs (the temporary Prefect server, torchrun or
    Dask workers): SIGTERM, SIGKILL after `timeout` s; their pids."""
    import psutil

    kids = psutil.Process().children(recursive=True)
    for p in kids:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(kids, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in kids]


def in_process(args, run) -> int:
    """`run()` (a flow in this process) until it returns, or until SIGTERM / Ctrl-C end it together with
    every process it started; its result on stdout."""
    end_on_sigterm()
    try:
        result = run()
    except KeyboardInterrupt as e:
        # Whatever the flow left running goes with it: nothing this run started outlives it.
        stopped = stop_children()
        print(f"pd {args.cmd}: {'ended by SIGTERM' if isinstance(e, Ended) else 'interrupted'}; stopped "
              f"{len(stopped)} process(es) it had started; finished stages are kept, a rerun resumes",
              file=sys.stderr)
        return 143 if isinstance(e, Ended) else 130
    print(json.dumps(result, indent=2, default=str) if isinstance(result, dict) else result)
    return 0
