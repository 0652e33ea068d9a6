"""Prompt grids (example pair | query | output | target) and caption grids: drawn during training
(validation, the base's samples) and by the evaluation, so they live in the model layer, which
pd_eval may import but not the reverse."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pd_data.tasks import Prompt

COLUMNS = ("example source", "example target", "query", "output", "target")


def prompt_grid(prompts: list[Prompt], outputs: np.ndarray, cell: int = 96) -> Image.Image:
    """One row per prompt, five columns, upscaled (nearest) so that 32 px images stay legible."""
    pad, header = 4, 14
    w = len(COLUMNS) * (cell + pad) + pad
    h = header + len(prompts) * (cell + pad) + pad
    grid = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(COLUMNS):
        draw.text((pad + j * (cell + pad), 2), name, fill=(0, 0, 0))
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        for j, arr in enumerate((p.example_source, p.example_target, p.query, out, p.target)):
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (pad + j * (cell + pad), header + pad + i * (cell + pad)))
    return grid


def caption_grid(images: np.ndarray, captions: list[str], cell: int = 128, per_row: int = 4) -> Image.Image:
    """Generated images with the caption each was made from, wrapped under it."""
    import textwrap

    rows = -(-len(images) // per_row)
    text_h = 44
    grid = Image.new("RGB", (per_row * (cell + 6) + 6, rows * (cell + text_h + 6) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = 6 + (i % per_row) * (cell + 6), 6 + (i // per_row) * (cell + text_h + 6)
        grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        draw.multiline_text((x, y + cell + 2), "\n".join(textwrap.wrap(cap, 24)[:4]), fill=(0, 0, 0), spacing=0)
    return grid
