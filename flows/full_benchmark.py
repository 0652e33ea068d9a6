"""`full-benchmark`: ingest -> annotate (+ evaluation prompts) -> train -> evaluate -> report."""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.stages import Overrides, annotate_flow, evaluate_flow, ingest_flow, make_plan, report_flow, train_flow


@flow(name="full-benchmark", log_prints=True)
def full_benchmark(profile: str = "demo", overrides: Overrides = None, state_dir: str | None = None) -> str:
    """The whole benchmark for one profile; finished stages are skipped. Returns the report path."""
    make_plan(profile, overrides, state_dir)  # validate the profile before any work starts
    ingest_flow(profile, overrides, state_dir)
    annotate_flow(profile, overrides, state_dir, upstream=False)
    train_flow(profile, overrides, state_dir, upstream=False)
    evaluate_flow(profile, overrides, state_dir, upstream=False)
    report = report_flow(profile, overrides, state_dir, upstream=False)
    get_run_logger().info("full-benchmark done; report at %s", report)
    return report
