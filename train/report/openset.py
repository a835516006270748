"""The open-set figures: `train osr` (AUROC / OSCR bars per method and score) and `train demo789` (the
drained share per class, and the outlier scores of known vs unknown images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..openset.runs import METHODS, drained_per_class, read_scores_csv
from .figures import bar_value_axis, error_bars, pyplot, save_figure
from .tables import spread_over


def plot_osr(agg: list[dict], rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars (mean +- std) of AUROC and OSCR per method / score; dots: the single runs. With a
    grid, only each method's own score (the one it is tuned by), so a tuning figure stays readable."""
    plt = pyplot()
    if any(a["params"] for a in agg):
        agg = [a for a in agg if a["score"] == METHODS[a["method"]].primary_score]
    labels = [a["setting"] for a in agg]
    height = 1.2 + 0.38 * len(agg)
    fig, axes = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
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


def plot_demo(runs: list[dict], path: Path, title: str) -> None:
    """Drained fraction per true class (Drainage), p_d of 0-6 vs 7/8/9, CE's MSP of 0-6 vs 7/8/9."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    drainage = [r for r in runs if r["method"] == "drainage"]
    split = runs[0]["eval_split"]
    if drainage:
        per_class = np.array([drained_per_class(r["run_dir"]) for r in drainage])
        colors = ["tab:green"] * 7 + ["tab:red"] * 3
        axes[0].bar(range(10), 100 * per_class.mean(0), yerr=100 * per_class.std(0), color=colors, capsize=3)
        axes[0].set(
            xticks=range(10),
            xlabel=f"true class of the {split} image",
            ylim=(0, 100),
            ylabel="drained (%): argmax is the drainage node",
            title=f"Drainage: {split} images drained per class\n(red: 7/8/9, relabelled in training; "
            f"{spread_over(len(drainage), 'run')})",
        )
        axes[0].grid(axis="y", alpha=0.3)
    for ax, method, score, name in (
        (axes[1], "drainage", "p_d", "p_d (drainage probability)"),
        (axes[2], "ce", "msp", "1 - max softmax (MSP outlier score)"),
    ):
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            ax.axis("off")
            continue
        dumps = [read_scores_csv(r["run_dir"]) for r in mine]
        values = np.concatenate([d[score].astype(float) for d in dumps])
        unknown = np.concatenate([d["set"] == "unknown" for d in dumps])
        bins = np.linspace(0, 1, 41)
        ax.hist(values[~unknown], bins, alpha=0.6, color="tab:green", density=True, label=f"{split} 0-6")
        ax.hist(values[unknown], bins, alpha=0.6, color="tab:red", density=True, label=f"{split} 7/8/9")
        auroc = np.mean([r["scores"][score]["AUROC"] for r in mine])
        ax.set(
            xlabel=name,
            ylabel="density",
            yscale="log",
            title=f"{METHODS[method].label}: AUROC {100 * auroc:.1f}% ({len(mine)} runs pooled)",
        )
        ax.legend()
    save_figure(fig, title, path)
