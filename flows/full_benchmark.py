"""`full-benchmark`: ingest -> annotate (+ evaluation prompts) -> train -> evaluate -> report."""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.runner import Force, Overrides, ProfileName, make_plan, with_parameter_help
from flows.stages import annotate, evaluate, ingest, report, train


@flow(name="full-benchmark", log_prints=True)
@with_parameter_help
def full_benchmark(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
                   force: Force = None) -> str:
    """The whole benchmark for one profile, from one frozen plan; finished stages are skipped (Cached),
    but those in `force` and the stages that read them are recomputed. Returns the report path.
    """
    plan = make_plan(profile, overrides, state_dir, force=force)
    ingest(plan)
    annotate(plan)
    train(plan)
    evaluate(plan)
    path = report(plan)
    get_run_logger().info("full-benchmark done; report at %s", path)
    return path
