"""`full-benchmark`: ingest -> annotate (+ evaluation prompts) -> train -> evaluate -> report."""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.stages import Force, Overrides, ProfileName, make_plan, through


@flow(name="full-benchmark", log_prints=True)
def full_benchmark(profile: ProfileName = "demo", overrides: Overrides = None, state_dir: str | None = None,
                   force: Force = None) -> str:
    """The whole benchmark for one profile, from one frozen plan; finished stages are skipped (Cached),
    but those in `force` and the stages that read them are recomputed. Returns the report path.

    Args:
        profile: Configuration profile: smoke (a minute), demo (CPU-sized) or paper (Stable Diffusion 1.5, GPU).
        overrides: Values over the profile's, by section, e.g. {"train": {"steps": 50}} or
            {"eval": {"guidance_scale": 1.5}}; `pd profile NAME` prints every key. Unknown keys are errors.
        state_dir: Folder of data, models, results and reports (default: $PD_STATE_DIR, else .pd).
        force: Stages to recompute though done, with every stage that reads them, e.g. ["evaluate"].
    """
    report = through(make_plan(profile, overrides, state_dir, force=force), "report", upstream=True)
    get_run_logger().info("full-benchmark done; report at %s", report)
    return report
