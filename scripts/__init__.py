"""The benchmarks and studies that docs/benchmarks.md and docs/results.md quote, over one shared harness.

Each script is a command-line program that calls the project's public API and times it with
`scripts.harness` (interleaved conditions, medians, JSON that says where it was measured). Run one
from the repository root either way:

    .venv/bin/python scripts/bench_train.py --help
    .venv/bin/python -m scripts.bench_train --help
"""
