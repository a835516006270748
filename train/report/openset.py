"""The open-set figures: `train osr` (AUROC / OSCR bars per method and score) and `train demo789` (the
drained share per class, and the outlier scores of known vs unknown images). They draw what they are
given: the runs' data are read by train/openset/ (the report layer never imports it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .figures import bar_value_axis, error_bars, pyplot, save_figure
from .tables import spread_over


def plot_osr(agg: list[dict], rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars (mean +- std) of AUROC and OSCR per method / score (agg: rows with "setting",
    "method", "params", "score", "primary" (the method's own score), "eval_split" and the metrics' mean
    and std); dots: the single runs. With a grid, only each method's own score (the one it is tuned by),
    so a tuning figure stays readable."""
    plt = pyplot()
    if any(a["params"] for a in agg):
        agg = [a for a in agg if a["primary"]]
    labels = [a["setting"] for a in agg]
    height = 1.2 + 0.38 * len(agg)
    fig, axes = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    methods = dict.fromkeys(a["method"] for a in agg)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    y = np.arange(len(agg))
    for ax, metric in zip(axes, ("AUROC", "OSCR")):
        means = [100 * a[f"{metric}_mean"] for a in agg]
        ax.barh(
            y,
            means,
            xerr=error_bars([100 * a[f"{metric}_std"] for a in agg]),
            capsize=3,
            color=[colors[a["method"]] for a in agg],
            alpha=0.75,
        )
        for i, a in enumerate(agg):
            runs = [
                100 * r[metric]
                for r in rows
                if (r["method"], r["params"], r["score"]) == (a["method"], a["params"], a["score"])
            ]
            ax.plot(runs, [i] * len(runs), "k.", ms=4)
            ax.text(99.7, i, f"{means[i]:.1f}", va="center", ha="right", fontsize=8)  # right of every dot
        ax.set_xlabel(f"{metric} (%), {agg[0]['eval_split']} set; dots: single splits")
        bar_value_axis(ax, min(100 * min(r[metric] for r in rows), min(means)), "x")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=9)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height))  # keep the title clear of the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_demo(
    drained: np.ndarray | None,
    panels: list[tuple[str, np.ndarray, np.ndarray, str]],
    split: str,
    path: Path,
    title: str,
) -> None:
    """Left: the drained share (runs x 10 true classes, mean +- std over the runs) of a model with an
    abstain output, or an empty panel (None). Then one panel per (score name, its values on the known
    images 0-6, on the unknown 7/8/9, the panel's title): density histograms, pooled over the runs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5.3 * (1 + len(panels)), 4.4), squeeze=False)
    axes = axes[0]
    if drained is not None:
        colors = ["tab:green"] * 7 + ["tab:red"] * 3
        axes[0].bar(range(10), 100 * drained.mean(0), yerr=100 * drained.std(0), color=colors, capsize=3)
        axes[0].set(
            xticks=range(10),
            xlabel=f"true class of the {split} image",
            ylim=(0, 100),
            ylabel="drained (%): argmax is the drainage node",
            title=f"Drainage: {split} images drained per class\n(red: 7/8/9, relabelled in training; "
            f"{spread_over(len(drained), 'run')})",
        )
        axes[0].grid(axis="y", alpha=0.3)
    else:
        axes[0].axis("off")
    bins = np.linspace(0, 1, 41)
    for ax, (name, known, unknown, panel_title) in zip(axes[1:], panels):
        ax.hist(known, bins, alpha=0.6, color="tab:green", density=True, label=f"{split} 0-6")
        ax.hist(unknown, bins, alpha=0.6, color="tab:red", density=True, label=f"{split} 7/8/9")
        ax.set(xlabel=name, ylabel="density", yscale="log", title=panel_title)
        ax.legend()
    save_figure(fig, title, path)
