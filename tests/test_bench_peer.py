"""scripts/bench_peer.py: skips cleanly without the original checkout; with one ($PD_ORIGINAL_REPO), the
original's and our networks, built at one small configuration with the same weights, agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_peer.py"


def _run(*args: str, env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_skips_without_the_original(tmp_path):
    missing = tmp_path / "no-such-checkout"
    out = _run("--original", str(missing))
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stdout and str(missing) in out.stdout
    assert "git clone https://github.com/Zhendong-Wang/Prompt-Diffusion" in out.stdout


def test_skips_a_folder_that_is_not_the_original(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PD_ORIGINAL_REPO"} | {"PD_ORIGINAL_REPO": str(tmp_path)}
    out = _run(env=env)
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stdout and "cldm/cldm.py" in out.stdout


ORIGINAL = os.environ.get("PD_ORIGINAL_REPO")


@pytest.mark.skipif(not ORIGINAL or not (Path(ORIGINAL) / "cldm" / "cldm.py").is_file(),
                    reason="no original Prompt Diffusion checkout in $PD_ORIGINAL_REPO")
def test_outputs_agree_with_the_original():
    out = _run("--original", ORIGINAL, "--check-only", "--check-batch", "1", "--layers", "1", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    check = result["agreement"]
    assert check["noise_prediction_max_abs"] > 0.1  # the comparison is not of two zero outputs
    assert check["noise_prediction_max_abs_diff"] < 1e-4
    assert check["controlnet_residuals_max_abs_diff"] < 1e-4
    assert result["params"]["original"] == result["params"]["ours"]
