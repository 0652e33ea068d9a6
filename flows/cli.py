"""`pd`: run the pipeline, manage the local Prefect stack, and query results.

    pd run [--profile smoke] [--stage full-benchmark] [-o train.steps=50 ...]
    pd generate --prompt TEXT --pair SRC TGT --query Q --out out.png [--model DIR]
    pd convert network-step=04999.ckpt --base SD15_DIR --out DIR
    pd edit --text TEXT --inverse-pair MAP IMG (--map M | --image I --forward-pair IMG MAP) --out out.png
    pd up | pd down                      start / stop the local Prefect server and worker
    pd results                           Table 1 of the latest completed run, and its report
    pd sql "SELECT count(*) FROM metrics"
    pd profile demo [-o ...]             print a profile's resolved configuration
    pd check [--profile paper] [-o ...]  every data folder and weight file the profile lacks, and where it goes
    pd retrain [--profile demo] [--dataset default] [--from-scratch] [-o ...]   one retraining round
    pd models [--dataset D]              the model registry: candidates, decisions, the current model
    pd rollback [--dataset D] [--to MODEL_ID]   make an earlier model current again (default: the previous one)
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
    state.require_writable()  # one line, not Prefect's tracebacks, when it cannot be written
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


def _checked_profile(args):
    """The resolved profile, or `ConfigError` / `FileNotFoundError` before anything starts."""
    from flows.preflight import require_inputs
    from flows.profiles import load_profile

    profile = load_profile(args.profile, _overrides(args.override))
    require_inputs(profile)
    return profile


def cmd_run(args) -> int:
    _checked_profile(args)  # in a fraction of a second, before Prefect (or its temporary server) starts
    _prepare_env()
    from flows import full_benchmark, stages

    fn = {"full-benchmark": full_benchmark.full_benchmark, "ingest": stages.ingest_flow,
          "annotate": stages.annotate_flow, "train": stages.train_flow, "evaluate": stages.evaluate_flow,
          "report": stages.report_flow}[args.stage]
    result = fn(profile=args.profile, overrides=_overrides(args.override))
    print(json.dumps(result, indent=2, default=str) if isinstance(result, dict) else result)
    return 0


def cmd_retrain(args) -> int:
    _prepare_env()
    from flows.retrain import retrain_flow

    result = retrain_flow(profile=args.profile, overrides=_overrides(args.override), dataset=args.dataset,
                          from_scratch=args.from_scratch)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_models(args) -> int:
    from pd_data.state import StateDir
    from pd_eval.registry import listing
    from pd_eval.store import format_table

    names, rows = listing(StateDir.resolve().db, args.dataset)
    if not rows:
        print("no models in the registry yet; run `pd retrain` (or the retrain deployment)")
        return 0
    print(format_table(names, rows))
    return 0


def cmd_rollback(args) -> int:
    from pd_data.state import StateDir
    from pd_eval.registry import rollback

    to = rollback(StateDir.resolve().db, args.dataset, args.to)
    print(f"dataset {args.dataset}: current model is now {to}")
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


def _pipeline(args):
    """The pipeline of `--model DIR`, or of the latest trained Prompt Diffusion model in the results."""
    from pd_data.state import StateDir
    from pd_eval.store import query
    from pd_model.pipeline import PromptDiffusionPipeline

    model = args.model
    if model is None:
        _, rows = query(StateDir.resolve().db, "SELECT m.path FROM models m JOIN runs r USING (eval_id) WHERE "
                        "m.kind IN ('prompt-diffusion', 'prompt_diffusion') AND r.status = 'completed' ORDER BY r.finished_at DESC LIMIT 1")
        if not rows:
            raise FileNotFoundError("no trained Prompt Diffusion model in the results; run a benchmark or pass --model DIR")
        model = rows[0][0]
    pipe = PromptDiffusionPipeline.from_trained(model, args.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sampling_kwargs(args) -> dict:
    import torch

    return {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "negative_prompt": args.negative,
            "pair_guidance_scale": args.pair_guidance, "generator": torch.Generator().manual_seed(args.seed)}


def _open(path: str):
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} not found")
    return Image.open(path).convert("RGB")


def cmd_generate(args) -> int:
    pipe = _pipeline(args)
    out = pipe(args.prompt, image_pair=(_open(args.pair[0]), _open(args.pair[1])), image=_open(args.query),
               **_sampling_kwargs(args)).images[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    print(args.out)
    return 0


def cmd_edit(args) -> int:
    from pd_model.editing import edit_one_step, edit_two_steps

    pipe = _pipeline(args)
    inverse = (_open(args.inverse_pair[0]), _open(args.inverse_pair[1]))
    if args.map:
        out = edit_one_step(pipe, _open(args.map), args.text, inverse, **_sampling_kwargs(args))
    else:
        if not (args.image and args.forward_pair):
            raise ValueError("two-step editing needs --image and --forward-pair IMAGE MAP (or give --map for one step)")
        predicted, out = edit_two_steps(pipe, _open(args.image), args.text, args.modality,
                                        (_open(args.forward_pair[0]), _open(args.forward_pair[1])), inverse,
                                        **_sampling_kwargs(args))
        predicted.save(Path(args.out).with_name(Path(args.out).stem + f"-{args.modality}.png"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    print(args.out)
    return 0


def _add_sampling_args(p) -> None:
    p.add_argument("--model", help="trained model folder (default: the latest Prompt Diffusion model)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=9.0, help="text guidance scale (paper: 9.0)")
    p.add_argument("--pair-guidance", type=float, default=None, help="separate guidance over the example pair")
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm", "unipc"))
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, default=0)


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


def cmd_stack(args) -> int:
    from flows import stack

    state = _prepare_env()
    (stack.up if args.cmd == "up" else stack.down)(state)
    return 0


def _parser() -> argparse.ArgumentParser:
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
    ck = sub.add_parser("check", help="list every data folder and weight file a profile needs and lacks")
    ck.add_argument("--profile", default="paper")
    ck.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ck.set_defaults(fn=cmd_check)
    p = sub.add_parser("profile", help="print a profile's resolved configuration")
    p.add_argument("name")
    p.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(fn=cmd_profile)
    g = sub.add_parser("generate", help="one prompt from image files: example pair + query + text -> PNG")
    g.add_argument("--prompt", required=True)
    g.add_argument("--pair", nargs=2, required=True, metavar=("SOURCE", "TARGET"), help="the example pair")
    g.add_argument("--query", required=True)
    _add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    e = sub.add_parser("edit", help="edit an image: one step (--map) or two steps (--image, --forward-pair)")
    e.add_argument("--text", required=True, help="the new text")
    e.add_argument("--inverse-pair", nargs=2, required=True, metavar=("MAP", "IMAGE"), help="example of map -> image")
    e.add_argument("--map", help="one step: the map of the image to edit")
    e.add_argument("--image", help="two steps: the image to edit")
    e.add_argument("--forward-pair", nargs=2, metavar=("IMAGE", "MAP"), help="two steps: example of image -> map")
    e.add_argument("--modality", default="depth", choices=("depth", "hed", "seg"))
    _add_sampling_args(e)
    e.set_defaults(fn=cmd_edit)
    c = sub.add_parser("convert", help="original Prompt Diffusion checkpoint (ldm layout) -> diffusers folder")
    c.add_argument("checkpoint", help="network-step=04999.ckpt or a .safetensors of it")
    c.add_argument("--base", required=True, help="the Stable Diffusion 1.5 folder (or its unet/config.json)")
    c.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    c.set_defaults(fn=cmd_convert)
    rt = sub.add_parser("retrain", help="one retraining round in this process (incremental data, candidate, decision)")
    rt.add_argument("--profile", default="demo")
    rt.add_argument("--dataset", default="default", help="name of the live dataset (a folder under data/live)")
    rt.add_argument("--from-scratch", action="store_true", help="train the candidate from scratch, not from the current model")
    rt.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    rt.set_defaults(fn=cmd_retrain)
    ml = sub.add_parser("models", help="the model registry: every candidate, its decision, the current model")
    ml.add_argument("--dataset", default=None)
    ml.set_defaults(fn=cmd_models)
    rb = sub.add_parser("rollback", help="make an earlier registry model current again")
    rb.add_argument("--dataset", default="default")
    rb.add_argument("--to", default=None, metavar="MODEL_ID", help="default: the model current before the present one")
    rb.set_defaults(fn=cmd_rollback)
    sub.add_parser("up", help="start the local Prefect server, pool, deployments and worker").set_defaults(fn=cmd_stack)
    sub.add_parser("down", help="stop the local Prefect server and worker").set_defaults(fn=cmd_stack)
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
