"""The benchmarks' one harness: clocks, interleaved conditions, summaries, JSON out, the machine.

A benchmark on a shared, noisy machine compares conditions rather than trusting one absolute time:
`interleave` runs them in rotated order every round, so drift (another job, a throttled core) hits
all of them alike, and `summary` reports the median with the spread beside it. Every JSON a script
writes carries `machine()`, so a number always says where it was measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pd_core.state import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]  # the repository root: scripts start their children from it
K = TypeVar("K", bound=Hashable)
Sync = Callable[[], None]


# ---------------------------------------------------------------------------------------------- clocks

def clock() -> float:
    """Seconds on the monotonic high-resolution clock (`time.perf_counter`): for intervals only."""
    return time.perf_counter()


@dataclasses.dataclass
class Lap:
    seconds: float = math.nan  # set when the `stopwatch` block ends


@contextmanager
def stopwatch(sync: Sync | None = None) -> Iterator[Lap]:
    """`with stopwatch() as lap: ...`, then `lap.seconds`. `sync` (e.g. `torch.cuda.synchronize`) runs
    before both clock reads, so work queued on a device is inside the interval and none from before."""
    lap = Lap()
    if sync:
        sync()
    t0 = clock()
    yield lap
    if sync:
        sync()
    lap.seconds = clock() - t0


def device_sync(device: str) -> Sync | None:
    """What makes a clock read wait for `device`: CUDA's synchronize; nothing on the CPU."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return torch.cuda.synchronize


# ---------------------------------------------------------------------------------------------- interleaving

def rotated(names: Sequence[K], r: int) -> list[K]:
    """The order of round `r`: it starts at the r-th name (ABC, BCA, CAB, ABC, ...)."""
    k = r % len(names) if names else 0
    return [*names[k:], *names[:k]]


def schedule(names: Iterable[K], repeats: int) -> Iterator[tuple[int, K]]:
    """(round, name) for `repeats` rounds in rotated order: each name takes each place equally often."""
    names = list(names)
    for r in range(repeats):
        for name in rotated(names, r):
            yield r, name


def interleave(conditions: Mapping[K, Callable[[], object]], repeats: int, warmup: int = 1, per_round: int = 1,
               sync: Sync | None = None) -> dict[K, list[float]]:
    """Seconds of every timed call of each condition: first `warmup` untimed calls of each, then
    `repeats` rounds (`schedule`) in which each condition makes `per_round` timed calls in a row."""
    for run in conditions.values():
        for _ in range(warmup):
            run()
    times: dict[K, list[float]] = {name: [] for name in conditions}
    for _, name in schedule(conditions, repeats):
        for _ in range(per_round):
            with stopwatch(sync) as lap:
                conditions[name]()
            times[name].append(lap.seconds)
    return times


# ---------------------------------------------------------------------------------------------- statistics

def median(samples: Iterable[float]) -> float:
    return statistics.median(samples)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """n, median, min, max and the interquartile range (q1, q3; inclusive quartiles) of `samples`."""
    xs = sorted(samples)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3}


def ratio(a: Iterable[float], b: Iterable[float]) -> float:
    """median(a) / median(b): with times, how many times slower a is than b."""
    return median(a) / median(b)


def matmul_flops(device: str, dtype, n: int = 2048, reps: int = 10) -> float:
    """Median FLOP/s of an n x n x n matmul on `device` in `dtype`, on seeded random data (never
    zeros: they run faster): the peak a step's achieved FLOP/s is compared with."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    times = interleave({"matmul": lambda: a @ b}, reps, warmup=3, sync=device_sync(str(device)))["matmul"]
    return 2 * n**3 / median(times)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- JSON

def jsonable(obj: Any) -> Any:
    """`obj` in JSON types: numpy and torch numbers as Python ones, arrays and tensors as nested lists,
    dataclasses, pydantic models and namespaces as dicts, tuples and sets as lists, anything else
    (a Path, a dtype, a device) as its text."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {_key(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v) for v in obj), key=str)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors (any device, any dtype)
        return jsonable(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if hasattr(obj, "model_dump"):  # pydantic
        return jsonable(obj.model_dump())
    if isinstance(obj, argparse.Namespace):
        return jsonable(vars(obj))
    return str(obj)


def _key(k: Any) -> str | int | float | bool | None:
    j = jsonable(k)
    return j if j is None or isinstance(j, (str, int, float, bool)) else str(k)  # ("ours", 8) -> "('ours', 8)"


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(jsonable(obj), indent=indent)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """`obj` as JSON at `path`, atomically: a reader sees the old file or the whole new one."""
    atomic_write_bytes(Path(path), (dumps(obj, indent) + "\n").encode())


def append_line(path: str | Path, obj: Any) -> None:
    """`obj` as one JSON line at the end of `path` (a JSON-lines log of results)."""
    with open(path, "a") as f:
        f.write(dumps(obj, indent=None) + "\n")


def emit(obj: Any, out: str | Path | None = None, indent: int | None = 2) -> None:
    """Print `obj` as JSON on stdout and, given `out`, write it there too."""
    print(dumps(obj, indent), flush=True)
    if out:
        write_json(out, obj, indent)


# ---------------------------------------------------------------------------------------------- the machine

def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(CPU model, its feature flags) from /proc/cpuinfo; elsewhere the platform's name and no flags."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags


def machine() -> dict[str, Any]:
    """Where a number was measured: the CPU and the flags that decide bf16 speed (AMX, AVX-512 bf16),
    cores, GPU, torch and its intra-op threads, Python, and when."""
    import torch  # here, not at import: `--help` stays fast

    cpu, flags = cpu_info()
    return {"cpu": cpu, "arch": platform.machine(), "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
