"""Where a result was computed. bf16 kernels round differently per CPU (oneDNN uses AMX on an Intel
Xeon, AVX-512 bf16 on an AMD EPYC), and BLAS sums in another order at another thread count, so the
same settings give other weights and other metrics on another machine: each stage's summary keeps
the facts of the machine that computed it, and the report says "trained on ... / evaluated on ...".

Gathering is cheap (no subprocess, no new heavy import) and never raises: a fact that cannot be read
on this platform is None."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

LIBRARIES = ("torch", "diffusers", "transformers", "numpy", "prefect", "clean-fid", "duckdb")
CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo (empty where there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in info:
            info[key.strip()] = value.strip()
    return info


def cpu_model(info: dict[str, str]) -> str | None:
    """x86 names its CPU in "model name"; arm64 kernels often name none ("Hardware", or only part numbers)."""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        if info.get(key):
            return info[key]
    if info.get("CPU implementer") and info.get("CPU part"):
        return f"CPU implementer {info['CPU implementer']}, part {info['CPU part']}"
    return platform.processor() or None


def cpu_flags(info: dict[str, str]) -> dict[str, bool | None]:
    """Whether each of `CPU_FLAGS` is present; None where the kernel lists no flags at all."""
    listed = info.get("flags") or info.get("Features")  # x86 / arm64
    if listed is None:
        return dict.fromkeys(CPU_FLAGS)
    have = set(listed.split())
    return {f: f in have for f in CPU_FLAGS}


def blas() -> list[dict]:
    """The BLAS libraries loaded in this process and their threads (threadpoolctl sees loaded ones only)."""
    try:
        from threadpoolctl import threadpool_info

        return [{"library": i.get("internal_api"), "version": i.get("version"), "threads": i.get("num_threads"),
                 "architecture": i.get("architecture")} for i in threadpool_info() if i.get("user_api") == "blas"]
    except Exception:  # a BLAS build threadpoolctl cannot introspect must not fail a stage
        return []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")  # only when the stage imported it: a fact, not a side effect
    try:
        return torch.get_num_threads() if torch is not None else None
    except Exception:
        return None


def machine_facts() -> dict:
    """This machine and process as they bear on numbers: CPU, its bf16 units, threads, BLAS, versions."""
    info = _cpuinfo()
    return {"cpu": cpu_model(info), "arch": platform.machine() or None, **cpu_flags(info),
            "torch_threads": _torch_threads(), "blas": blas(), "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "versions": {"python": platform.python_version(), **{p: _version(p) for p in LIBRARIES}}}


def training_precision(setting: str, device: str, key: str) -> dict:
    """How a training under `setting` (`mixed_precision`) computes on `device`, as `pd_model.precision` resolves it."""
    import torch

    from pd_model.precision import describe, resolve

    return {"key": key, "setting": setting, "resolved": describe(resolve(setting, torch.device(device), key)), "device": device}


def describe_machine(facts: dict | None) -> str:
    """One line: 'AMD EPYC (x86_64; AVX-512 bf16, no AMX), torch 8 threads, openblas 0.3.31 at 2 threads'."""
    if not facts:
        return "not recorded (computed before machine facts were kept)"
    units = {True: "", False: "no ", None: "? "}
    bf16 = f"{units[facts.get('avx512_bf16')]}AVX-512 bf16, {units[facts.get('amx_bf16')]}AMX"
    libs = ", ".join(f"{b['library']} {b['version'] or ''} at {b['threads']} threads".replace("  ", " ")
                     for b in facts.get("blas") or []) or "no BLAS seen"
    core = f", OPENBLAS_CORETYPE={facts['openblas_coretype']}" if facts.get("openblas_coretype") else ""
    return (f"{facts.get('cpu') or 'unknown CPU'} ({facts.get('arch') or '?'}; {bf16}), "
            f"torch {facts.get('torch_threads') or '?'} threads, {libs}{core}")


def describe_versions(facts: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in ((facts or {}).get("versions") or {}).items() if v)


def run_provenance(summaries: dict[str, dict | None]) -> tuple[str | None, dict]:
    """The `runs` row's `precision` and `machine` from the stage summaries (stage -> summary, None for a
    stage this run has not got): each stage's machine as recorded when it was computed, which for a
    Cached stage is an earlier run's, and this process's as `report`."""
    machine = {stage: (s or {}).get("machine") for stage, s in summaries.items() if s is not None}
    parts = [f"{stage} {p['resolved']} ({p['key']}={p['setting']} on {p['device']})"
             for stage, s in summaries.items() if s and (p := s.get("precision"))]
    return ("; ".join(parts) or None), machine | {"report": machine_facts()}


def where_lines(precision: str | None, machine: dict | None) -> list[str]:
    """The report's "Where this ran": the machine of each stage as the `runs` row keeps it."""
    m = machine or {}
    train, evaluate = m.get("train"), m.get("evaluate")
    lines = [f"trained on: {describe_machine(train)}"]
    if m.get("base") and m["base"] != train:
        lines.append(f"base trained on: {describe_machine(m['base'])}")
    lines.append("evaluated on: " + ("the same machine, threads and libraries" if evaluate and evaluate == train
                                     else describe_machine(evaluate)))
    lines.append(f"training precision: {precision or 'not recorded'}")
    for stage, facts in (("training", train), ("evaluation", evaluate)):
        if facts and (stage == "training" or facts.get("versions") != (train or {}).get("versions")):
            lines.append(f"libraries ({stage}): {describe_versions(facts)}")
    if any("bfloat16" in part and part.endswith("on cpu)") for part in (precision or "").split("; ")):
        lines.append("bf16 on a CPU: oneDNN's bf16 kernels (AMX on Intel Xeon, AVX-512 bf16 on AMD EPYC) round "
                     "differently, so the same settings give other weights on another CPU")
    return lines
