"""Evaluation prompts, materialised once in Parquet so that every model sees exactly the same ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pd_data.config import PromptConfig
from pd_data.dataset import SplitData
from pd_data.shards import PROMPTS_SCHEMA, write_shard
from pd_data.tasks import get_task


def materialise_prompts(data: SplitData, tasks: tuple[str, ...], cfg: PromptConfig, out_path: Path) -> int:
    """`cfg.per_task` prompts per task, drawn with an explicit seed; returns the row count."""
    groups = data.multi_image_groups
    if not groups:
        raise ValueError(f"the {cfg.split!r} split has no group with two images; evaluation prompts need one")
    rows = []
    for t_idx, name in enumerate(tasks):
        spec = get_task(name)
        rng = np.random.default_rng([cfg.seed, t_idx])
        for i in range(cfg.per_task):
            ids = data.groups[groups[int(rng.integers(len(groups)))]]
            a, b = rng.choice(len(ids), size=2, replace=False)
            example_id, query_id = ids[int(a)], ids[int(b)]
            text = data.captions[query_id] if spec.text == "caption" else spec.fixed_text
            rows.append({"prompt_id": f"{name}/{i:05d}", "task": name, "example_id": example_id,
                         "query_id": query_id, "text": text, "seed": int(rng.integers(2**31))})
    write_shard(out_path, rows, PROMPTS_SCHEMA)
    return len(rows)
