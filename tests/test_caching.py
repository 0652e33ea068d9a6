"""Prefect-native caching of stages: keyed by the plan, Cached in the UI, and `force` recomputes a stage
and what reads it, through the real Prefect engine."""
import shutil

import pytest

from conftest import TINY
from flows.dag import descendants
from flows.plan import Plan
from flows.profiles import ConfigError, load_profile
from flows.stages import annotate_flow
from pd_core.state import StateDir
from test_e2e import _mtimes, stage_states


def test_descendants_follow_the_plans_dependencies():
    assert descendants(["annotate"]) == ("annotate", "prompts", "base", "train", "evaluate")
    assert descendants(["prompts"]) == ("prompts", "evaluate")
    assert descendants(["base"]) == ("base", "train", "evaluate")
    assert descendants([]) == ()


def test_force_that_cannot_apply_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot force \['trian'\]"):
        Plan.build(load_profile("smoke", TINY), StateDir(tmp_path), force=["trian"])
    sd = load_profile("smoke", {**TINY, "data": {**TINY["data"], "resolution": 64},
                                "base": {"kind": "sd15", "pretrained_path": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"force=\['base'\] cannot apply"):
        Plan.build(sd, StateDir(tmp_path), force=["base"])


def test_cached_forced_and_gone_stages(prefect_engine, state_dir):
    first = annotate_flow("smoke", TINY, return_state=True)
    assert stage_states(first) == dict.fromkeys(("ingest", "annotate", "prompts"), "Completed")
    plan = Plan.build(load_profile("smoke", TINY), StateDir.resolve())
    rows = first.result()["rows"]
    assert stage_states(annotate_flow("smoke", TINY, return_state=True)) == dict.fromkeys(("ingest", "annotate", "prompts"), "Cached")

    # Forcing annotate recomputes it and prompts (which reads it), not ingest; same rows, new files.
    ingest_before, annotate_before = _mtimes(plan.dir("ingest")), _mtimes(plan.dir("annotate"))
    forced = annotate_flow("smoke", TINY, force=["annotate"], return_state=True)
    assert stage_states(forced) == {"ingest": "Cached", "annotate": "Completed", "prompts": "Completed"}
    assert forced.result()["rows"] == rows and _mtimes(plan.dir("ingest")) == ingest_before
    after = _mtimes(plan.dir("annotate"))
    assert after.keys() == annotate_before.keys() and all(after[k] != annotate_before[k] for k in after)
    assert not list(plan.dir("annotate").parent.glob(".*.forced"))  # what it replaced is gone
    assert stage_states(annotate_flow("smoke", TINY, return_state=True))["annotate"] == "Cached"

    # A cached summary whose files were deleted is not used: the stage is computed again.
    shutil.rmtree(plan.dir("prompts"))
    again = annotate_flow("smoke", TINY, return_state=True)
    assert stage_states(again) == {"ingest": "Cached", "annotate": "Cached", "prompts": "Completed"}
    assert (plan.dir("prompts") / "prompts.parquet").exists()
