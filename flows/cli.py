"""`pd`: run the pipeline, manage the local Prefect stack, and query results.

    pd run [--profile demo] [--stage full-benchmark] [--force STAGE] [-o train.steps=50 ...]
    pd generate --prompt TEXT --pair SRC TGT --query Q --out out.png [--model DIR | --dataset D]
    pd convert network-step=04999.ckpt --base SD15_DIR --out DIR
    pd edit --text TEXT --inverse-pair MAP IMG (--map M | --image I --forward-pair IMG MAP) --out out.png
    pd up | pd down                      start / stop the local Prefect server and worker
    pd follow full-benchmark/demo [-o ...]  start a deployment run and follow it: progress, stages, errors
    pd schedule on|off [--deployment retrain/demo]   resume / pause a deployment's schedules (weekly retraining)
    pd results [--format table|json|csv]  Table 1 of the latest completed run, and its report
    pd sql "SELECT count(*) FROM metrics" [--format ...]   read-only: no statement can write or reach out
    pd profile demo [-o ...]             print a profile's resolved configuration
    pd check [--profile paper] [-o ...]  every data folder and weight file the profile lacks, and where it goes
    pd retrain [--profile demo] [--dataset default] [--from-scratch] [-o ...]   one retraining round
    pd models [--dataset D] [--benchmark] [--format ...]  the latest benchmark's models; the registry of retraining
    pd rollback [--dataset D] [--to MODEL_ID]   make an earlier model current again (default: the previous one)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.cli_parser import Commands, Help
from flows.dag import FLOWS, STAGES
from flows.process import in_process, prepare_env

# The names `pd_model.pipeline.SCHEDULERS` defines (tests/test_cli.py checks they agree), spelled here
# so that `pd --help` does not import torch.
SCHEDULER_NAMES = ("ddim", "dpm", "unipc")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prompt-diffusion-pipeline")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed; pip install -e .)"


def _print_rows(names: list[str], rows: list[tuple], fmt: str) -> None:
    from pd_eval.store import format_rows

    print(format_rows(names, rows, fmt))


def _overrides(items: list[str]) -> dict:
    from flows.profiles import merge_settings, parse_override

    out: dict = {}
    for item in items:
        out = merge_settings(out, parse_override(item))
    return out


def _checked_profile(args):
    """The resolved profile, or `ConfigError` / `FileNotFoundError` before anything starts."""
    from flows.preflight import require_inputs
    from flows.profiles import load_profile

    profile = load_profile(args.profile, _overrides(args.override))
    require_inputs(profile)
    return profile


def cmd_run(args) -> int:
    def run():
        _checked_profile(args)  # in a fraction of a second, before Prefect (or its temporary server) starts
        prepare_env()
        from flows import full_benchmark, stages

        fn = {"full-benchmark": full_benchmark.full_benchmark, "ingest": stages.ingest_flow,
              "annotate": stages.annotate_flow, "train": stages.train_flow, "evaluate": stages.evaluate_flow,
              "report": stages.report_flow}[args.stage]
        return fn(profile=args.profile, overrides=_overrides(args.override), force=args.force or None)

    return in_process(args, run)


def cmd_retrain(args) -> int:
    def run():
        prepare_env()
        from flows.retrain import retrain_flow

        return retrain_flow(profile=args.profile, overrides=_overrides(args.override), dataset=args.dataset,
                            from_scratch=args.from_scratch)

    return in_process(args, run)


def cmd_models(args) -> int:
    """The registry (retraining rounds) and, in a table or with --benchmark, the latest benchmark's models:
    a benchmark trains its own models and never enters the registry."""
    from pd_core.state import StateDir
    from pd_eval.registry import listing
    from pd_eval.store import benchmark_models

    db = StateDir.resolve().db
    if args.benchmark or (args.format == "table" and args.dataset is None):
        run, names, rows = benchmark_models(db)
        if args.format != "table":
            _print_rows(names, rows, args.format)
            return 0
        if run is None:
            print("benchmark models: none yet; `make benchmark` (or `pd run`) trains them")
        else:
            print(f"benchmark models of run {run['run_id']} (profile {run['profile']}, finished {run['finished_at']:%Y-%m-%d %H:%M}):")
            _print_rows(names, rows, args.format)
        if args.benchmark:
            return 0
        print()
    names, rows = listing(db, args.dataset)
    if not rows and args.format == "table":
        print("model registry: no models yet; it holds the candidates of retraining rounds: `pd retrain` "
              "(or the retrain deployment, `pd schedule on`)")
        return 0
    if args.format == "table":
        print("model registry (retraining rounds):")
    _print_rows(names, rows, args.format)
    return 0


def cmd_rollback(args) -> int:
    from pd_core.state import StateDir
    from pd_eval.registry import rollback

    to = rollback(StateDir.resolve().db, args.dataset, args.to)
    print(f"dataset {args.dataset}: current model is now {to}")
    return 0


def cmd_sql(args) -> int:
    from pd_core.state import StateDir
    from pd_eval.store import query

    names, rows = query(StateDir.resolve().db, args.query)
    _print_rows(names, rows, args.format)
    return 0


def cmd_results(args) -> int:
    from pd_core.state import StateDir
    from pd_eval.store import latest_results

    names, rows, run = latest_results(StateDir.resolve().db)
    _print_rows(names, rows, args.format)
    if run and args.format == "table":
        print(f"\nrun {run[0]}\nreport: {run[1]}\n        {Path(run[1]).with_suffix('.html')}")
    return 0


def _model_folder(args) -> str:
    """`--model DIR`; else the registry's current model of `--dataset`; else the latest benchmark's
    Prompt Diffusion model; else an error that says how to get one."""
    from pd_core.state import StateDir
    from pd_eval.store import current_model_path
    from pd_model.controlnet import spellings

    if args.model is not None:
        return args.model
    db = StateDir.resolve().db
    if not db.exists():
        raise FileNotFoundError(f"no trained model yet ({db} does not exist); run a benchmark (make benchmark) or "
                                f"`pd retrain`, or pass --model DIR")
    path = current_model_path(db, args.dataset, spellings("prompt-diffusion"))
    if path is None:
        raise FileNotFoundError(f"no current model of dataset {args.dataset!r} in the registry and no trained Prompt Diffusion "
                                f"model in the results; run a benchmark or `pd retrain`, or pass --model DIR")
    return path


def _sampler(args):
    """The sampler of `--scheduler`, `--steps`, `--guidance`, ... (defaults: the evaluation's)."""
    from pd_model.config import Sampler

    return Sampler(args.scheduler, args.steps, args.guidance, args.pair_guidance, args.negative)


def cmd_generate(args) -> int:
    from pd_model.editing import generate_file

    print(generate_file(_model_folder(args), args.prompt, tuple(args.pair), args.query, args.out, _sampler(args), args.seed))
    return 0


def cmd_edit(args) -> int:
    from pd_model.editing import edit_file

    written = edit_file(_model_folder(args), args.text, tuple(args.inverse_pair), args.out, map_path=args.map,
                        image=args.image, forward_pair=tuple(args.forward_pair) if args.forward_pair else None,
                        modality=args.modality, sampler=_sampler(args), seed=args.seed)
    print(written[-1])
    return 0


def _add_sampling_args(p) -> None:
    from pd_model.config import Sampler

    p.add_argument("--model", help="trained model folder (default: the registry's current model of --dataset, else "
                                   "the latest benchmark's Prompt Diffusion model)")
    p.add_argument("--dataset", default="default", help="the registry dataset whose current model is used without --model")
    p.add_argument("--out", required=True, help="output PNG")
    d = Sampler()
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps (the evaluation's)")
    p.add_argument("--guidance", type=float, default=d.guidance_scale, help="text guidance scale, as the evaluation samples "
                                                                            "(the paper's protocol: 9.0)")
    p.add_argument("--pair-guidance", type=float, default=d.pair_guidance_scale, help="separate guidance over the example pair")
    p.add_argument("--scheduler", default=d.scheduler, choices=SCHEDULER_NAMES, help="sampler")
    p.add_argument("--negative", default=d.negative_prompt, help="negative prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")


def cmd_convert(args) -> int:
    from pd_model.convert import convert_checkpoint

    net = convert_checkpoint(args.checkpoint, args.base, args.out, hint_range="-1,1")
    n = sum(p.numel() for p in net.parameters())
    print(f"converted {args.checkpoint} -> {args.out} ({n / 1e6:.1f} M parameters, hint_range -1,1)")
    return 0


def cmd_check(args) -> int:
    """Every input the profile needs that is missing, with where to put it; exit 1 if any."""
    from flows.preflight import missing_inputs
    from flows.profiles import load_profile

    profile = load_profile(args.profile, _overrides(args.override))
    missing = missing_inputs(profile)
    for m in missing:
        print(f"missing  {m}")
    print(f"profile {profile.name!r}: " + (f"{len(missing)} input(s) missing" if missing else "every input is in place"))
    return 1 if missing else 0


def cmd_profile(args) -> int:
    from flows.profiles import load_profile

    print(load_profile(args.name, _overrides(args.override)).model_dump_json(indent=2))
    return 0


def cmd_follow(args) -> int:
    """A deployment run through the server (`pd up`), followed to its end: exit 0 when it completed, 1 when not."""
    from flows.profiles import merge_settings

    state = prepare_env()
    from flows import stack

    os.environ.setdefault("PREFECT_API_URL", stack.API_URL)  # the server `pd up` started, without sourcing env.sh
    params = json.loads(args.params) if args.params else {}
    if not isinstance(params, dict):
        raise ValueError(f"--params {args.params!r}: give a JSON object, e.g. '{{\"force\": [\"evaluate\"]}}'")
    if args.override:
        params["overrides"] = merge_settings(params.get("overrides") or {}, _overrides(args.override))
    from flows.follow import follow

    return follow(args.deployment, params, state.root / "logs" / "worker.log")


def cmd_stack(args) -> int:
    from flows import stack

    state = prepare_env()
    (stack.up if args.cmd == "up" else stack.down)(state)
    return 0


def cmd_schedule(args) -> int:
    from flows import stack

    prepare_env()
    api = os.environ.get("PREFECT_API_URL", stack.API_URL)  # the server `pd up` started, unless told otherwise
    active = {"on": True, "off": False, "show": None}[args.action]
    for s in stack.set_schedules(args.deployment, active, api):
        print(f"{args.deployment}: {s.schedule} {'on' if s.active else 'paused'} (schedule id {s.id})")
    return 0


def _pipeline_commands(c: Commands) -> None:
    """Running the pipeline, reading its results, checking its inputs."""
    r = c.command("run", "run a flow in this process (against $PREFECT_API_URL if set)", cmd_run)
    r.add_argument("--profile", default="demo", choices=c.profiles, help="configuration profile (the one `make benchmark` runs)")
    r.add_argument("--stage", default="full-benchmark", choices=FLOWS, help="the flow: the whole chain or one stage (with its upstream)")
    r.add_argument("--force", action="append", default=[], choices=STAGES, metavar="STAGE",
                   help=f"recompute this stage and every stage that reads it, though done (repeatable; one of {', '.join(STAGES)})")
    c.overrides(r)
    s = c.command("sql", "run a read-only SQL query on the results database", cmd_sql)
    s.add_argument("query", help="SQL (SELECT, DESCRIBE, SHOW, ...); nothing that writes, attaches, installs or reads outside the state directory")
    c.table_format(s)
    c.table_format(c.command("results", "Table 1 of the latest completed run", cmd_results))
    ck = c.command("check", "list every data folder and weight file a profile needs and lacks", cmd_check)
    ck.add_argument("--profile", default="paper", choices=c.profiles, help="configuration profile")
    c.overrides(ck)
    p = c.command("profile", "print a profile's resolved configuration", cmd_profile)
    p.add_argument("name", choices=c.profiles, help="configuration profile")
    c.overrides(p)


def _model_commands(c: Commands) -> None:
    """Using and converting trained models."""
    g = c.command("generate", "one prompt from image files: example pair + query + text -> PNG", cmd_generate)
    g.add_argument("--prompt", required=True, help="the text prompt")
    g.add_argument("--pair", nargs=2, required=True, metavar=("SOURCE", "TARGET"), help="the example pair")
    g.add_argument("--query", required=True, help="the query image")
    _add_sampling_args(g)
    e = c.command("edit", "edit an image: one step (--map) or two steps (--image, --forward-pair)", cmd_edit)
    e.add_argument("--text", required=True, help="the new text")
    e.add_argument("--inverse-pair", nargs=2, required=True, metavar=("MAP", "IMAGE"), help="example of map -> image")
    e.add_argument("--map", help="one step: the map of the image to edit")
    e.add_argument("--image", help="two steps: the image to edit")
    e.add_argument("--forward-pair", nargs=2, metavar=("IMAGE", "MAP"), help="two steps: example of image -> map")
    e.add_argument("--modality", default="depth", choices=c.forward_modalities, help="two steps: the map the image goes through")
    _add_sampling_args(e)
    c = c.command("convert", "original Prompt Diffusion checkpoint (ldm layout) -> diffusers folder", cmd_convert)
    c.add_argument("checkpoint", help="network-step=04999.ckpt or a .safetensors of it")
    c.add_argument("--base", required=True, help="the Stable Diffusion 1.5 folder (or its unet/config.json)")
    c.add_argument("--out", required=True, help="output folder (save_pretrained layout)")


def _registry_commands(c: Commands) -> None:
    """Retraining rounds and the model registry."""
    rt = c.command("retrain", "one retraining round in this process (incremental data, candidate, decision)", cmd_retrain)
    rt.add_argument("--profile", default="demo", choices=c.profiles, help="configuration profile")
    rt.add_argument("--dataset", default="default", help="name of the live dataset (a folder under data/live)")
    rt.add_argument("--from-scratch", action="store_true", help="train the candidate from scratch, not from the current model")
    c.overrides(rt)
    ml = c.command("models", "the latest benchmark's models, and the model registry of retraining: every candidate, its "
                           "decision, the current model", cmd_models)
    ml.add_argument("--dataset", default=None, help="the registry of one live dataset only (default: the benchmark's "
                                                   "models and every dataset's registry)")
    ml.add_argument("--benchmark", action="store_true", help="only the latest completed benchmark run's models (with "
                                                            "--format json|csv: they instead of the registry)")
    c.table_format(ml)
    rb = c.command("rollback", "make an earlier registry model current again", cmd_rollback)
    rb.add_argument("--dataset", default="default", help="name of the live dataset")
    rb.add_argument("--to", default=None, metavar="MODEL_ID", help="the model to make current (default: the one current before the present one)")


def _stack_commands(c: Commands) -> None:
    """The local Prefect stack: deployments, runs followed, schedules."""
    fo = c.command("follow", "start a deployment run and follow it here: each stage's progress lines (done/total, rate, "
                           "ETA, loss) and task run states; on failure the error and where the full log is; exit 0 "
                           "when it completed, 1 when not (needs `pd up`)", cmd_follow)
    fo.add_argument("deployment", metavar="FLOW/DEPLOYMENT", help="the deployment to run, e.g. full-benchmark/demo "
                                                                   "(`prefect deployment ls` lists them)")
    fo.add_argument("--params", default=None, metavar="JSON", help="flow parameters over the deployment's, "
                    "e.g. '{\"force\": [\"evaluate\"]}' (default: the deployment's own)")
    c.overrides(fo)
    c.command("up", "start the local Prefect server, pool, deployments and worker", cmd_stack)
    c.command("down", "stop the local Prefect server and worker", cmd_stack)
    sc = c.command("schedule", "resume (on) or pause (off) a deployment's schedules on the server, or show them", cmd_schedule)
    sc.add_argument("action", choices=("on", "off", "show"), help="on: resume, off: pause, show: list them")
    sc.add_argument("--deployment", default="retrain/demo", metavar="FLOW/DEPLOYMENT",
                    help="the deployment (`prefect deployment ls` lists them)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pd", description=__doc__, formatter_class=Help)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    c = Commands(ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND"))
    for add in (_pipeline_commands, _model_commands, _registry_commands, _stack_commands):
        add(c)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - a CLI prints the reason, not a traceback
        if os.environ.get("PD_DEBUG"):
            raise
        print(f"pd {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
