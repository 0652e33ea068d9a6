"""What the check ran on, the accelerator's bf16 peak (datasheet and measured), and timing helpers."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess

import torch

from scripts.harness import device_sync, matmul_flops, stopwatch

# Dense bf16 tensor-core TFLOP/s from NVIDIA's datasheets (the sparse figure halved). The first name
# contained in the device's name wins, so the more specific names come first.
BF16_DENSE_TFLOPS = (("H200 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100 NVL", 835.0),
                     ("H100 PCIe", 756.0), ("H100", 989.0), ("B200", 2250.0), ("B100", 1750.0),
                     ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
                     ("A10", 125.0), ("RTX 4090", 165.0))
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "pydantic", "controlnet-aux", "duckdb", "numpy")


def datasheet_peak(name: str) -> tuple[float | None, str | None]:
    """(dense bf16 TFLOP/s, the table's entry) for a device name; (None, None) when unknown."""
    for key, tflops in BF16_DENSE_TFLOPS:
        if key in name:
            return tflops, key
    return None, None


def sync(device: torch.device | str) -> None:
    """Wait for the device's queue (nothing to wait for on a CPU)."""
    wait = device_sync(str(device))
    if wait is not None:
        wait()


def timed(fn, device) -> float:
    """Seconds one call of `fn` takes, the device's queue drained before and after."""
    with stopwatch(device_sync(str(device))) as lap:
        fn()
    return lap.seconds


def matmul_tflops(device: torch.device, n: int, reps: int = 10, dtype=torch.bfloat16) -> float:
    """Median TFLOP/s of an n x n x n matmul on random data."""
    return matmul_flops(device, dtype, n, reps) / 1e12


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _driver() -> str | None:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _gpus() -> list[dict]:
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        peak, entry = datasheet_peak(p.name)
        gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                     "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                     "bf16_dense_tflops_datasheet": peak, "datasheet_entry": entry})
    return gpus


def describe(device: torch.device, tiny: bool) -> dict:
    """The machine section: devices, versions, the precision switches that move timings, a measured peak."""
    cuda = device.type == "cuda"
    n = (2048 if tiny else 8192) if cuda else (256 if tiny else 1024)  # a CPU: seconds at 2048
    info = {"device": str(device), "gpu_count": torch.cuda.device_count() if cuda else 0, "gpus": _gpus() if cuda else [],
            "cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "driver": _driver() if cuda else None, "packages": _versions(),
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    info["measured_bf16_matmul_tflops"] = round(matmul_tflops(device, n), 4)
    info["measured_matmul_n"] = n
    return info


def peak_of(machine: dict | None) -> tuple[float | None, float | None]:
    """(datasheet bf16 TFLOP/s of GPU 0 or None, measured bf16 matmul TFLOP/s or None) of a machine section."""
    if not machine:
        return None, None
    gpus = machine.get("gpus") or [{}]
    return gpus[0].get("bf16_dense_tflops_datasheet"), machine.get("measured_bf16_matmul_tflops")
