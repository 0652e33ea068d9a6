"""The stage DAG and the flows, by name: spelled once, here, in a module that imports nothing heavy
(`pd --help` reads it without loading torch or Prefect).

Stages are the plan's units of caching (`flows.plan`); flows are what a user runs (`pd run STAGE`, the
deployments of prefect.yaml): the full benchmark, one per stage of the chain, and the report."""
from __future__ import annotations

STAGES = ("ingest", "annotate", "prompts", "base", "train", "evaluate")
# What each stage reads. The base reads the annotated split (an image without its maps is left out;
# with base.map_fraction it learns the maps too), so it follows the annotations.
UPSTREAM = {"ingest": (), "annotate": ("ingest",), "prompts": ("annotate",), "base": ("annotate",),
            "train": ("annotate", "base"), "evaluate": ("train", "prompts")}


def descendants(stages) -> tuple[str, ...]:
    """`stages` and every stage that reads them, directly or not, in `STAGES` order."""
    out = set(stages)
    for s in STAGES:  # dependency order: a stage's upstream is settled before it
        if out & set(UPSTREAM[s]):
            out.add(s)
    return tuple(s for s in STAGES if s in out)


FLOWS = ("full-benchmark", "ingest", "annotate", "train", "evaluate", "report")
