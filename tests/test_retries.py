"""Only transient errors are retried: a deterministic one fails at once instead of twice more, 5 s apart."""
import errno

import pytest
from prefect import task

from flows.profiles import ConfigError
from flows.runner import RETRIES


@pytest.mark.parametrize("error, calls", [
    (ValueError("data.resolution=30 must be a multiple of 8"), 1),
    (ConfigError("train.stepz=3: there is no such setting"), 1),
    (TypeError("unsupported operand"), 1),
    (KeyError("hed"), 1),
    (FileNotFoundError(errno.ENOENT, "no such file", "images-00000.parquet"), 1),
    (PermissionError(errno.EACCES, "permission denied", "/state"), 1),
    (OSError(errno.ENOSPC, "no space left on device"), 3),
    (TimeoutError("read timed out"), 3),
    (ConnectionResetError(errno.ECONNRESET, "connection reset by peer"), 3),
])
def test_the_stage_tasks_retry_only_transient_errors(prefect_engine, error, calls):
    attempts = []

    # The stages' own retry settings, without the 5 s wait between attempts.
    @task(**{**RETRIES, "retry_delay_seconds": 0})
    def shard() -> None:
        attempts.append(1)
        raise error

    with pytest.raises(type(error)):
        shard()
    assert len(attempts) == calls == (1 + RETRIES["retries"] if calls > 1 else 1)


def test_a_transient_error_that_passes_is_retried_to_success(prefect_engine):
    attempts = []

    @task(**{**RETRIES, "retry_delay_seconds": 0})
    def shard() -> int:
        attempts.append(1)
        if len(attempts) < 2:
            raise OSError(errno.EIO, "input/output error")
        return len(attempts)

    assert shard() == 2
