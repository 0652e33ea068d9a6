"""Pictures for people: loss curves, metric bars with intervals and confusion matrices. Prompt and
caption grids are in `pd_model.visuals` (training draws them too)."""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

_PYPLOT = threading.Lock()


def _one_figure_at_a_time(fn):
    """pyplot keeps global state and is not thread-safe: two flow runs in one process (threads) draw in turn."""
    @functools.wraps(fn)
    def drawn(*args, **kwargs):
        with _PYPLOT:
            return fn(*args, **kwargs)
    return drawn



@_one_figure_at_a_time
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


def _err(r: dict, bound: str) -> float:
    """Distance from the value to an interval bound; 0 where the interval is undefined (NaN, None)."""
    b = r[bound]
    return 0.0 if b is None or not np.isfinite(b) else abs(r["value"] - b)


@_one_figure_at_a_time
def metric_bars(panels: dict[str, list[dict]], path: Path, title: str) -> Path:
    """One panel per metric: grouped bars, one group per task and one bar per model, 95% intervals as
    error bars. `panels`: panel title -> dicts with task, model, value, ci_low, ci_high."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for rows in panels.values() for r in rows})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], panels.items()):
        tasks = sorted({r["task"] for r in rows})
        here = [m for m in models if any(r["model"] == m for r in rows)]
        width = 0.8 / len(here)
        for k, model in enumerate(here):
            got = [(i, r) for i, t in enumerate(tasks) for r in rows if r["task"] == t and r["model"] == model]
            ax.bar([i + (k - (len(here) - 1) / 2) * width for i, _ in got], [r["value"] for _, r in got], width,
                   yerr=[[_err(r, "ci_low") for _, r in got], [_err(r, "ci_high") for _, r in got]],
                   capsize=2, color=colors[model], label=model)
        ax.set_xticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_title(name, fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[m]) for m in models]
    legend_rows = -(-len(models) // 4)
    fig.legend(handles, models, fontsize=7, ncol=4, loc="lower center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / fig.get_figheight(), 1, 1))  # ~0.25 inch per legend row
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@_one_figure_at_a_time
def confusion_plot(matrix: np.ndarray, labels: list[str], path: Path, title: str,
                   columns: list[str] | None = None) -> Path:
    """A confusion matrix as a heat map with its counts: rows shown (`labels`), columns predicted
    (`columns`, the same labels unless given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(columns or labels)), columns or labels, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("task the output follows")
    ax.set_ylabel("task the example pair shows")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
