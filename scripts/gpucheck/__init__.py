"""The pieces of `scripts/gpu_check.py`, one module per section of its JSON: `machine`, `training`,
`sampling` (the evaluation), `annotators`, `e2e` and `multi` (several GPUs), over the random-init
models of `models` and the budget and record of `record`."""
