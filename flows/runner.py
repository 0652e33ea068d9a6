"""How a stage runs: one Prefect task per stage, cached by the plan's key, computed at most once per key
(`run_stage`); the fan-out of shard tasks over threads or a Dask cluster (`run_mapped`); the run's plan
after preflight (`make_plan`); the flow parameters' types and their help in the UI."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Callable, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import CachePolicy

from flows.artifacts import to_run_log
from flows.dag import STAGES
from flows.plan import Plan
from flows.profiles import PROFILES, load_profile
from pd_core.progress import Progress, set_sink
from pd_core.state import StateDir, fingerprint, is_done, mark_done, read_done, remove_stale_temporaries, stage_lock

# Flow parameters, typed: `prefect deployment run` validates them and the UI shows a form with choices.
Overrides = dict[str, Any] | None
ProfileName = Literal[tuple(PROFILES)]  # type: ignore[valid-type]
StageName = Literal[STAGES]  # type: ignore[valid-type]
Force = list[StageName] | None  # type: ignore[valid-type]
# OSErrors that waiting does not fix: a missing or unreadable path is the same 5 s later.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn(task, task_run, state)`: retry an I/O error that may pass (a full or
    slow disk, a timeout, a dropped connection), never a deterministic one (ValueError, ConfigError,
    TypeError, KeyError, a missing file), which would fail again the same way, twice, 5 s apart."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, PERMANENT_OS_ERRORS)


# Idempotent work (each resumes or rewrites the same files): retried on a transient error only.
RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": transient}


def make_plan(profile: str, overrides: Overrides, state_dir: str | None, trains: bool = True, force: Force = None) -> Plan:
    """The run's frozen plan, after its whole configuration, every input it names, the state directory
    and (for a flow that `trains`) the training devices are checked (preflight). `force`: stages to
    recompute, with their descendants."""
    from datetime import datetime, timezone

    from flows.preflight import require_inputs

    started = datetime.now(timezone.utc)  # before the checks: they are part of the run
    p = load_profile(profile, overrides)
    require_inputs(p)
    if trains:
        from pd_eval.generation import check_devices as check_eval_devices
        from pd_model.train_dist import check_devices

        check_devices(p.train)  # a process count this machine cannot place fails now, not after the base
        check_eval_devices(p.eval)
    from pd_core.launch import check_gpu_workers

    check_gpu_workers(p.data.gpu_workers)
    state = StateDir.resolve(state_dir)
    state.require_writable()
    set_sink(to_run_log)
    return Plan.build(p, state, force or (), started_at=started)


@dataclass
class PlanKey(CachePolicy):
    """A stage's Prefect cache key is its plan key (`flows.plan`): its code, configuration and upstream keys."""

    key: str = ""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        return self.key


def run_stage(plan: Plan, stage: str, compute: Callable[[], dict]) -> dict:
    """The stage's summary, from its Prefect task named `stage`: Cached (the persisted summary) when its
    key's record exists and the stage's files are done; else computed once, or read from the done marker."""
    out = plan.dir(stage)
    refresh = stage in plan.force or not is_done(out)  # a cached summary of files that are gone is not used
    key = fingerprint(stage, plan.key(stage), str(plan.state.root.resolve()))  # two state dirs may share one PREFECT_HOME
    run = stage_task.with_options(name=stage, task_run_name=stage, cache_policy=PlanKey(key=key), refresh_cache=refresh)
    return run(plan, stage, compute)


@task(persist_result=True, result_serializer="json")
def stage_task(plan: Plan, stage: str, compute: Callable[[], dict]) -> dict:
    out, log = plan.dir(stage), get_run_logger()
    forced = stage in plan.force
    if forced or not is_done(out):
        with stage_lock(out, on_wait=lambda: log.info("%s: another run is computing it (key %s); waiting", stage, plan.key(stage))):
            aside = out.parent / f".{out.name}.forced"
            if forced and out.exists():
                shutil.rmtree(aside, ignore_errors=True)
                out.rename(aside)  # what the stage made before: out of the way, deleted once the new one is done
                log.info("%s: forced; recomputing from scratch (key %s)", stage, plan.key(stage))
            if not is_done(out):
                if n := remove_stale_temporaries(out):
                    log.info("%s: removed %d temporary file(s) of an interrupted run", stage, n)
                summary = compute()
                mark_done(out, summary)
                shutil.rmtree(aside, ignore_errors=True)
                return summary
    log.info("%s: already computed for these inputs (key %s) at %s; skipping", stage, plan.key(stage), out)
    return read_done(out)


def require(plan: Plan, *stages: str) -> None:
    """Each of `stages` is done for the plan's inputs, else an error naming the first that is not."""
    for stage in stages:
        if not is_done(plan.dir(stage)):
            raise RuntimeError(f"stage {stage!r} has not been run for these inputs (expected {plan.dir(stage)}); "
                               f"run it first or call this flow with upstream=True")


def run_mapped(task_fn, cfg, name: str, *args) -> list:
    """`task_fn.map(*args)`, over the cluster `cfg` (the data config) names: threads in this process; a
    local Dask cluster of data.workers processes or of one worker per GPU; or an existing cluster at
    data.dask_address."""
    def fan_out() -> list:
        from prefect.futures import as_completed

        futures = task_fn.map(*args)
        bar = Progress(name, name.replace("-", " "), len(futures), "shard")
        for _ in as_completed(futures):
            bar.advance()
        return [f.result() for f in futures]

    runner = dask_runner(cfg)
    if runner is None:
        return fan_out()
    return flow(fan_out, name=name, flow_run_name=name.replace("-", " "), task_runner=runner)()


def dask_runner(cfg):
    """The Dask task runner of the data config `cfg`; None for threads in this process (data.workers 1)."""
    from pd_core.launch import visible_gpus

    if cfg.dask_address is None and cfg.workers == 1 and not cfg.gpu_workers:
        return None
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address is not None:
        return DaskTaskRunner(address=cfg.dask_address)
    n = visible_gpus() if cfg.gpu_workers else cfg.workers
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


# The help of every flow parameter, shown in the UI's run form (Prefect reads a Google-style "Args:"
# section of the flow's docstring): written once, added to each flow by `with_parameter_help`.
PARAMETER_HELP = {
    "profile": "Configuration profile: smoke (minutes: trials and tests), demo (CPU-sized) or paper (Stable Diffusion 1.5, GPU).",
    "overrides": 'Values over the profile\'s, by section, e.g. {"train": {"steps": 50}} or {"eval": {"guidance_scale": 1.5}}; '
                 "`pd profile NAME` prints every key. Unknown keys are errors.",
    "state_dir": "Folder of data, models, results and reports (default: $PD_STATE_DIR, else .pd).",
    "upstream": "Run the stages before this one that are not done yet; if false, they must be done.",
    "force": 'Stages to recompute though done, with every stage that reads them, e.g. ["evaluate"].',
}


def with_parameter_help(fn):
    """`fn` with an "Args:" section for each of its parameters that `PARAMETER_HELP` describes (apply
    it under `@flow`, which reads the docstring when it wraps the function)."""
    import inspect
    import textwrap

    names = [n for n in inspect.signature(fn).parameters if n in PARAMETER_HELP]
    lines = [textwrap.fill(f"{n}: {PARAMETER_HELP[n]}", 100, initial_indent="    ", subsequent_indent="        ")
             for n in names]
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(lines) + "\n"
    return fn


