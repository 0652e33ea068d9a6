"""Pictures for people: prompt grids (example pair | query | output | target) and loss curves."""
from __future__ import annotations

from pathlib import Path

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


def loss_plot(curves: dict[str, list[float]], path: Path, smooth: int = 20) -> Path:
    """Smoothed training-loss curves, one line per model, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        if not losses:
            continue
        y = np.convolve(losses, np.ones(min(smooth, len(losses))) / min(smooth, len(losses)), mode="valid")
        ax.plot(np.arange(len(y)) + 1, y, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (moving mean of {smooth})")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
