"""`pd`: run the pipeline, manage the local Prefect stack, and query results.

    pd run [--profile smoke] [--stage full-benchmark] [-o train.steps=50 ...]
    pd up | pd down                      start / stop the local Prefect server and worker
    pd results                           Table 1 of the latest completed run, and its report
    pd sql "SELECT count(*) FROM metrics"
    pd profile demo [-o ...]             print a profile's resolved configuration
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STAGES = ("full-benchmark", "ingest", "annotate", "train", "evaluate", "report")


def _prepare_env() -> "StateDir":  # noqa: F821
    """Prefect's home inside the state directory, analytics off; must run before Prefect is imported."""
    from pd_data.state import StateDir

    state = StateDir.resolve()
    os.environ.setdefault("PREFECT_HOME", str(state.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLCONFIGDIR", str(state.root / "cache" / "matplotlib"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return state


def _overrides(items: list[str]) -> dict:
    from flows.profiles import _merge, parse_override

    out: dict = {}
    for item in items:
        out = _merge(out, parse_override(item))
    return out


def cmd_run(args) -> int:
    _prepare_env()
    from flows import full_benchmark, stages

    fn = {"full-benchmark": full_benchmark.full_benchmark, "ingest": stages.ingest_flow,
          "annotate": stages.annotate_flow, "train": stages.train_flow, "evaluate": stages.evaluate_flow,
          "report": stages.report_flow}[args.stage]
    result = fn(profile=args.profile, overrides=_overrides(args.override))
    print(json.dumps(result, indent=2, default=str) if isinstance(result, dict) else result)
    return 0


def cmd_sql(args) -> int:
    from pd_data.state import StateDir
    from pd_eval.store import format_table, query

    names, rows = query(StateDir.resolve().db, args.query)
    print(format_table(names, rows))
    return 0


def cmd_results(args) -> int:
    from pd_data.state import StateDir
    from pd_eval.store import format_table, query

    db = StateDir.resolve().db
    names, rows = query(db, "SELECT * EXCLUDE (run_id) FROM latest_paper_table ORDER BY profile = 'paper', model")
    print(format_table(names, rows))
    _, runs = query(db, "SELECT run_id, report_path FROM runs WHERE status = 'completed' ORDER BY finished_at DESC LIMIT 1")
    if runs:
        print(f"\nrun {runs[0][0]}\nreport: {runs[0][1]}\n        {Path(runs[0][1]).with_suffix('.html')}")
    return 0


def cmd_profile(args) -> int:
    from flows.profiles import load_profile

    print(load_profile(args.name, _overrides(args.override)).model_dump_json(indent=2))
    return 0


def cmd_stack(args) -> int:
    from flows import stack

    state = _prepare_env()
    (stack.up if args.cmd == "up" else stack.down)(state)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a flow in this process (against $PREFECT_API_URL if set)")
    r.add_argument("--profile", default="smoke", help="smoke | demo | paper (default smoke)")
    r.add_argument("--stage", default="full-benchmark", choices=STAGES)
    r.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("sql", help="run a read-only SQL query on the results database")
    s.add_argument("query")
    s.set_defaults(fn=cmd_sql)
    sub.add_parser("results", help="Table 1 of the latest completed run").set_defaults(fn=cmd_results)
    p = sub.add_parser("profile", help="print a profile's resolved configuration")
    p.add_argument("name")
    p.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(fn=cmd_profile)
    sub.add_parser("up", help="start the local Prefect server, pool, deployments and worker").set_defaults(fn=cmd_stack)
    sub.add_parser("down", help="stop the local Prefect server and worker").set_defaults(fn=cmd_stack)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - a CLI prints the reason, not a traceback
        if os.environ.get("PD_DEBUG"):
            raise
        print(f"pd {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
