#!/usr/bin/env bash
# The GPU check in one command, for a machine with PyTorch but not this project's other packages:
#
#     bash scripts/gpu_check.sh                 # full check, JSON to stdout and to $OUT/gpu_check.json
#     bash scripts/gpu_check.sh --tiny          # the same code paths on the CPU with tiny models
#     bash scripts/gpu_check.sh --budget-s 300  # any scripts/gpu_check.py argument is passed on
#
# Installs from wheels/ (scripts/gpu_wheels.sh builds it) only what this interpreter lacks or has in an
# older version, into $PD_SITE (default /tmp/pd_site, put first on PYTHONPATH), with no network; then
# runs scripts/gpu_check.py. If the check outlives its own watchdog, it is killed 15 s later and the JSON
# it saved after its last finished section is printed instead (complete=false).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${PD_SITE:-/tmp/pd_site}
WHEELS=${WHEELS:-wheels}
JSON=${OUT:+$OUT/gpu_check.json}
JSON=${JSON:-$(mktemp -t pd-gpu-check-XXXXXX.json)}

# The wheels this interpreter can load whose package is missing or older here (one per package).
needed=$("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata, sys
from pathlib import Path
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
from packaging.version import Version

ours = set(sys_tags())
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(whl.name)
    if not tags & ours:
        continue
    try:
        have = Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have is None or have < version:
        print(whl)
EOF
) || { echo "gpu_check.sh: cannot read $WHEELS (build it with scripts/gpu_wheels.sh)" >&2; exit 2; }
if [ -n "$needed" ]; then
  echo "gpu_check.sh: installing into $SITE: $(echo $needed | xargs -n1 basename | tr '\n' ' ')" >&2
  # shellcheck disable=SC2086 - one path per word
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $needed >&2 \
    || { echo "gpu_check.sh: installing the wheels failed" >&2; exit 2; }
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Nothing can be fetched there: no hub downloads, and no hub kernels (transformers >= 5.2x asks for them).
export HF_HUB_OFFLINE=1 USE_HUB_KERNELS=NO PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MPLCONFIGDIR=${MPLCONFIGDIR:-/tmp/pd-mpl}

# The hard limit: the check's own deadline (--deadline-s, else --budget-s + 40, else 460 s) plus 15 s.
budget=420 deadline=
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --budget-s) budget=${args[i + 1]:-$budget} ;;
    --budget-s=*) budget=${args[i]#*=} ;;
    --deadline-s) deadline=${args[i + 1]:-} ;;
    --deadline-s=*) deadline=${args[i]#*=} ;;
  esac
done
deadline=${deadline:-$(( ${budget%.*} + 40 ))}
timeout -k 5 $(( ${deadline%.*} + 15 )) "$PY" scripts/gpu_check.py --json-out "$JSON" "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu_check.sh: the check was killed at its hard limit; the JSON of its last finished section:" >&2
  cat "$JSON"
fi
echo "gpu_check.sh: exit $rc; JSON in $JSON" >&2
exit "$rc"
