"""Evaluation prompts, materialised once in Parquet so that every model sees exactly the same ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pd_data.config import PromptConfig, more_data
from pd_data.dataset import SplitData
from pd_data.shards import PROMPTS_SCHEMA, write_shard
from pd_data.tasks import get_task


def distinct_pairs(data: SplitData, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """n distinct (example, query) pairs drawn as training draws them (`SplitData.draw_pair`), repeats
    redrawn; when n is more than half of all pairs, a seeded shuffle of all of them instead (redrawing
    the last few would take long). Too few pairs is an error naming both numbers."""
    total = data.pair_count()
    if n > total:
        raise ValueError(f"the {data.pairing!r} pairing of this split allows {total} distinct (example, query) pairs, "
                         f"fewer than prompts.per_task={n}; lower prompts.per_task, {more_data(data.source)} "
                         f"or change data.pairing")
    if 2 * n > total:
        pairs = data.all_pairs()
        return [pairs[int(i)] for i in rng.permutation(len(pairs))[:n]]
    seen: dict[tuple[str, str], None] = {}
    while len(seen) < n:
        seen.setdefault(data.draw_pair(rng))
    return list(seen)


def materialise_prompts(data: SplitData, tasks: tuple[str, ...], cfg: PromptConfig, out_path: Path) -> int:
    """`cfg.per_task` prompts per task, no (example, query) twice within a task, drawn with an
    explicit seed under the split's pairing; returns the row count."""
    rows = []
    for t_idx, name in enumerate(tasks):
        spec = get_task(name)
        rng = np.random.default_rng([cfg.seed, t_idx])
        for i, (example_id, query_id) in enumerate(distinct_pairs(data, cfg.per_task, rng)):
            text = data.captions[query_id] if spec.text == "caption" else spec.fixed_text
            rows.append({"prompt_id": f"{name}/{i:05d}", "task": name, "example_id": example_id,
                         "query_id": query_id, "text": text, "seed": int(rng.integers(2**31))})
    write_shard(out_path, rows, PROMPTS_SCHEMA)
    return len(rows)
