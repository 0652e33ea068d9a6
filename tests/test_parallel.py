"""The Dask task runner (data.workers > 1) writes exactly what the default runner writes."""
import hashlib

from flows.plan import Plan
from flows.profiles import load_profile
from flows.stages import annotate_flow
from pd_data.shards import read_shards
from pd_core.state import StateDir

OVER = {"data": {"n_groups": 8, "shard_size": 8}}


def _digest(plan: Plan) -> str:
    h = hashlib.sha256()
    for stage, prefix in (("ingest", "images"), ("annotate", "annotations")):
        h.update(str(read_shards(plan.dir(stage), prefix).to_pylist()).encode())
    return h.hexdigest()


def test_dask_workers_write_the_same_rows(prefect_engine, tmp_path):
    digests = []
    for workers in (1, 2):
        over = {"data": {**OVER["data"], "workers": workers}}
        state = tmp_path / f"w{workers}"
        summary = annotate_flow("smoke", over, str(state))
        assert summary["rows"] == 32 * 6 and summary["shards"] == 4
        digests.append(_digest(Plan.build(load_profile("smoke", over), StateDir.resolve(state))))
    assert digests[0] == digests[1]
