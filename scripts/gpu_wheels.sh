#!/usr/bin/env bash
# Builds wheels/: the packages scripts/gpu_check.py imports that the GPU machine's image lacks (it has
# PyTorch, transformers, accelerate, huggingface-hub, safetensors, timm, OpenCV, scikit-image, scipy,
# pyarrow, torchmetrics, tensorboard, ...; not these), for `bash scripts/gpu_check.sh` to install there
# with no network. Run it here, where pip reaches the registry:
#
#     PYTHON=.venv/bin/python bash scripts/gpu_wheels.sh      # then carry wheels/ with the call
#
# Versions: diffusers, controlnet-aux and clean-fid as pyproject.toml pins them; the others as installed
# in $PYTHON's environment (what the test suite ran). pydantic-core, the one compiled package the
# project's config needs, comes for each of $PYTHONS (default cp311, cp312, cp313; manylinux x86_64);
# duckdb (imported by the evaluation's store, the e2e section only) as its one abi3 wheel (cp312 and
# later, 25 MB): on Python 3.11 the e2e section says duckdb is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PYTHONS=${PYTHONS:-"311 312 313"}
DEST=${WHEELS:-wheels}
PURE="diffusers pydantic annotated-types typing-inspection typing-extensions controlnet-aux clean-fid"
PLATFORMS=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_28_x86_64)

# NAME==VERSION: pyproject.toml's `==` pin, else the version installed beside $PYTHON.
pinned() {
  "$PYTHON" - "$1" <<'EOF'
import importlib.metadata, re, sys, tomllib
name = sys.argv[1]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = {norm(m[1]): m[2] for d in deps if (m := re.match(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)", d))}
print(f"{name}=={pins.get(norm(name)) or importlib.metadata.version(name)}")
EOF
}

download() {  # pip download with no dependencies (each one is named here), quietly
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" "$@"
}

rm -rf "$DEST"
mkdir -p "$DEST"
for name in $PURE; do
  download "$(pinned "$name")"
done
core=$(pinned pydantic-core)
for v in $PYTHONS; do
  download --python-version "$v" --implementation cp --abi "cp$v" "${PLATFORMS[@]}" "$core"
done
download --python-version 3.12 --implementation cp --abi abi3 "${PLATFORMS[@]}" "$(pinned duckdb)"
ls -1 "$DEST"
du -sh "$DEST"
