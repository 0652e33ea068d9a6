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


def test_an_existing_dask_cluster_writes_the_same_rows(prefect_engine, tmp_path):
    """data.dask_address: the shards run on a cluster someone else started (a `distributed` scheduler
    with two worker processes here), and the rows are those of the in-process run."""
    from distributed import LocalCluster

    digests = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        for label, extra in (("threads", {}), ("cluster", {"dask_address": cluster.scheduler_address})):
            over = {"data": {**OVER["data"], **extra}}
            state = tmp_path / label
            summary = annotate_flow("smoke", over, str(state))
            assert summary["rows"] == 32 * 6 and summary["shards"] == 4
            digests.append(_digest(Plan.build(load_profile("smoke", over), StateDir.resolve(state))))
    assert digests[0] == digests[1]


def test_cluster_settings_are_one_choice_and_gpu_workers_need_a_gpu(monkeypatch):
    import pytest

    from flows.profiles import ConfigError
    from pd_core import launch

    with pytest.raises(ConfigError, match="data.workers=2 and data.dask_address='tcp://h:8786' cannot apply together"):
        load_profile("smoke", {"data": {"workers": 2, "dask_address": "tcp://h:8786"}})
    with pytest.raises(ConfigError, match="data.workers=3 and data.gpu_workers=true cannot apply together"):
        load_profile("smoke", {"data": {"workers": 3, "gpu_workers": True}})
    with pytest.raises(ConfigError, match="data.dask_address is empty"):
        load_profile("smoke", {"data": {"dask_address": " "}})
    # The cluster settings say where shards run, not what they hold: the ingest key does not move.
    plain, remote = (Plan.build(load_profile("smoke", o), StateDir.resolve("unused")).key("ingest")
                     for o in ({}, {"data": {"dask_address": "tcp://h:8786"}}))
    assert plain == remote
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    with pytest.raises(ValueError, match="data.gpu_workers=true but no CUDA device is visible"):
        launch.check_gpu_workers(True)
    launch.check_gpu_workers(False)
    assert [launch.worker_gpu(name, 4) for name in (0, "1", 3, 5)] == [0, 1, 3, 1]
    with pytest.raises(ValueError, match="has no index for a GPU"):
        launch.worker_gpu("tcp://10.0.0.5:40000", 4)
