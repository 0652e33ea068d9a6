"""Pictures for people: prompt grids (example pair | query | output | target), loss curves, metric
bars with intervals and confusion matrices."""
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


def metric_bars(rows: list[dict], path: Path, title: str) -> Path:
    """Grouped bars, one group per task and one bar per model, with 95% intervals as error bars.
    `rows`: dicts with task, model, value, ci_low, ci_high (one metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    models = sorted({r["model"] for r in rows})
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) * max(1, len(models)) / 2), 3.6))
    for k, model in enumerate(models):
        got = {r["task"]: r for r in rows if r["model"] == model}
        xs = [i + (k - (len(models) - 1) / 2) * width for i, t in enumerate(tasks) if t in got]
        vals = [got[t]["value"] for t in tasks if t in got]
        lo = [max(0.0, got[t]["value"] - got[t]["ci_low"]) if got[t]["ci_low"] is not None and np.isfinite(got[t]["ci_low"]) else 0.0
              for t in tasks if t in got]
        hi = [max(0.0, got[t]["ci_high"] - got[t]["value"]) if got[t]["ci_high"] is not None and np.isfinite(got[t]["ci_high"]) else 0.0
              for t in tasks if t in got]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, label=model)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_plot(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """A confusion matrix as a heat map with its counts: rows shown, columns predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("task the output follows")
    ax.set_ylabel("task the example pair shows")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
