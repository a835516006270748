"""Figures: pyplot() (matplotlib with the Agg backend, imported lazily: no display needed), error bars,
the bar value axis, the sweep, grid and default-job figures, and the panels the cleaning figures share
(p_d histograms, precision@k curves).

One run has no spread: its std is nan and its error bar is left out. Bars encode length from zero, so a
bar axis starts at 0 or, zoomed in, carries a break mark (bar_value_axis).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from .tables import loss_label, spread_over


def error_bars(stds) -> np.ndarray:
    """stds as error-bar lengths: 0 where a single run has no std (nan)."""
    return np.nan_to_num(np.asarray(stds, dtype=float), nan=0.0)


def bar_value_axis(ax, lowest: float, axis: str = "y", high: float = 100.0) -> None:
    """Sets the value axis of a bar chart (percent) to end at `high` and start at 0, or, when every bar
    ends above 20% (lowest: the smallest bar end, error bar included), a little below lowest, with a
    break mark (two slashes across the axis's start, gid "axis_break") and a note in the axis label:
    a bar that starts above zero must not read as a length."""
    low = 0.0 if not math.isfinite(lowest) or lowest < 20 else 5 * math.floor((lowest - 2) / 5)
    (ax.set_ylim if axis == "y" else ax.set_xlim)(low, high)
    if low <= 0:
        return
    d = 0.012
    style = {"transform": ax.transAxes, "color": "k", "clip_on": False, "lw": 1, "gid": "axis_break"}
    for offset in (0.0, 0.02):
        if axis == "y":
            ax.plot((-d, d), (offset - d, offset + d), **style)
        else:
            ax.plot((offset - d, offset + d), (-d, d), **style)
    label = ax.get_ylabel() if axis == "y" else ax.get_xlabel()
    (ax.set_ylabel if axis == "y" else ax.set_xlabel)(f"{label} (axis starts at {low:g})")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(
    agg: list[dict],
    path: Path,
    title: str,
    metrics=(("last_eval_acc", "last epoch"), ("best_eval_acc", "best epoch")),
) -> None:
    """Grouped bars: one group per noise setting (agg "noise"), one bar per series (agg "setting"), mean
    +- std; one panel per metric. Drainage bars are outlined."""
    plt = pyplot()
    settings = list(dict.fromkeys(a["noise"] for a in agg))
    series = list(dict.fromkeys(a["setting"] for a in agg))
    cell = {(a["setting"], a["noise"]): a for a in agg}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.6), squeeze=False)
    width = 0.8 / len(series)
    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    split = agg[0].get("eval_split", "test")
    for ax, (metric, label) in zip(axes[0], metrics):
        lows = []
        for i, name in enumerate(series):
            present = [(name, s) in cell for s in settings]
            means = np.array(
                [100 * cell[name, s][f"{metric}_mean"] if ok else np.nan for s, ok in zip(settings, present)]
            )
            stds = error_bars(
                [100 * cell[name, s][f"{metric}_std"] if ok else 0 for s, ok in zip(settings, present)]
            )
            lows.append(np.nanmin(means - stds))
            x = np.arange(len(settings)) + (i - (len(series) - 1) / 2) * width
            drainage = name.startswith("Drainage")
            ax.bar(
                x,
                means,
                width,
                yerr=stds,
                capsize=2,
                label=name,
                color=colors(i),
                edgecolor="black" if drainage else "none",
                linewidth=1.2 if drainage else 0,
            )
        ax.set_xticks(np.arange(len(settings)), settings)
        ax.set_xlabel("label noise (type:rate)")
        ax.set_ylabel(f"clean {split} accuracy (%)")
        ax.set_title(f"{label}, {spread_over(agg[0]['n'], 'seed')}")
        bar_value_axis(ax, min(lows), "y")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(series), 6), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * ((len(series) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_grid(
    agg: list[dict], path: Path, title: str, selected: dict[str, str], metric: str = "last_eval_acc"
) -> None:
    """A hyper-parameter sweep: one panel per loss, one row of horizontal bars per grid point (one bar per
    noise setting, mean +- std); the selected point's label is starred."""
    plt = pyplot()
    losses = list(dict.fromkeys(a["loss"] for a in agg))
    settings = list(dict.fromkeys(a["noise"] for a in agg))
    cell = {(a["loss"], a["params"], a["noise"]): a for a in agg}
    points = {loss: list(dict.fromkeys(a["params"] for a in agg if a["loss"] == loss)) for loss in losses}
    cols = 2 if len(losses) > 1 else 1
    rows = -(-len(losses) // cols)
    heights = [max(len(points[loss]) for loss in losses[r * cols : (r + 1) * cols]) for r in range(rows)]
    panel_heights = [0.42 * h + 1.2 for h in heights]
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(8 * cols, sum(panel_heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": panel_heights},
    )
    colors = plt.get_cmap("tab10")
    lo = min(100 * a[f"{metric}_mean"] - error_bars(100 * a[f"{metric}_std"]) for a in agg)
    for ax, loss in zip(axes.flat, losses):
        height = 0.8 / len(settings)
        for j, setting in enumerate(settings):
            y = np.arange(len(points[loss])) + (j - (len(settings) - 1) / 2) * height
            means = [100 * cell[loss, p, setting][f"{metric}_mean"] for p in points[loss]]
            stds = error_bars([100 * cell[loss, p, setting][f"{metric}_std"] for p in points[loss]])
            ax.barh(y, means, height, xerr=stds, capsize=1.5, color=colors(j), label=setting)
        labels = [("★ " if p == selected.get(loss) else "") + (p or "preset") for p in points[loss]]
        ax.set_yticks(np.arange(len(points[loss])), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{loss_label(loss)}", fontsize=11)
        ax.set_xlabel(f"clean {agg[0].get('eval_split', 'val')} accuracy (%), last epoch")
        bar_value_axis(ax, lo, "x")
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(losses) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{title}\n★ = selected: highest mean over the noise settings", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_default_job(runs: dict[str, dict], path: Path, title: str) -> None:
    """runs: loss -> {"history": [...], "scores": npz dict}. Three panels: clean test accuracy per epoch;
    mean p_d of clean (solid) vs flipped (dashed) training samples per epoch, one colour per loss with an
    abstain output; the final p_d histogram of Drainage's training samples."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    colors = {loss: plt.get_cmap("tab10")(i) for i, loss in enumerate(runs)}
    for loss, run in runs.items():
        h = run["history"]
        epochs = [r["epoch"] for r in h]
        axes[0].plot(
            epochs, [100 * r["eval_acc"] for r in h], label=loss_label(loss), lw=2, color=colors[loss]
        )
        if "pd_clean" in h[-1]:
            axes[1].plot(epochs, [r["pd_clean"] for r in h], color=colors[loss], lw=2, label=loss_label(loss))
            axes[1].plot(epochs, [r["pd_flipped"] for r in h], color=colors[loss], lw=2, ls="--")
    axes[0].set(xlabel="epoch", ylabel="clean test accuracy (%)", title="Accuracy on the clean test set")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].set(
        xlabel="epoch",
        ylabel="mean p_d",
        title="Abstain probability p_d on the training set\n(solid: clean labels, dashed: flipped)",
    )
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    drain = runs.get("drainage")
    if drain:
        pd_histograms(axes[2], drain["scores"], drain["scores"]["p_drain"])
        axes[2].set(
            xlabel="p_d (drainage probability), last epoch", title="Drainage: p_d of training samples"
        )
    else:
        axes[2].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def risk_coverage_panel(ax, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> None:
    """Selective risk (%) against coverage (%), one line per label -> (coverage, risk) (arrays of one
    length, as drainage_fast.openset.risk_coverage_curve gives them); a label ending in "/ MSP" is dashed,
    in the colour of the label before it. The reported coverages are marked."""
    from drainage_fast.openset import REPORTED_COVERAGES

    colors, seen = pyplot().get_cmap("tab10"), {}
    for label, (coverage, risk) in curves.items():
        model = label.rsplit(" / ", 1)[0]
        color = colors(seen.setdefault(model, len(seen)) % 10)
        ax.plot(
            100 * coverage,
            100 * risk,
            lw=1.8,
            color=color,
            ls="--" if label.endswith("/ MSP") else "-",
            label=label,
        )
    for c in REPORTED_COVERAGES:
        ax.axvline(100 * c, color="grey", lw=0.6, alpha=0.5)
    ax.set(
        xlabel="coverage (%): share accepted, most confident first",
        ylabel="selective risk (%)",
        xlim=(0, 100),
    )
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Risk-coverage (lower is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_risk_coverage(panels: dict[str, dict], path: Path, title: str) -> None:
    """One risk_coverage_panel per panel title -> {label: (coverage, risk)}."""
    width = max(9.0, 6.5 * len(panels))
    fig, axes = pyplot().subplots(1, len(panels), figsize=(width, 4.8), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        risk_coverage_panel(ax, curves, name)
    save_figure(fig, textwrap.fill(title, int(14 * width)), path)


def pd_histograms(ax, scores: dict, p_d: np.ndarray) -> None:
    """Density histograms of p_d (N,) for the flipped training samples, the clean ones of classes that lost
    samples to flips, and the clean ones of the other classes (scores: a run's scores.npz, with "noisy"
    and "clean" labels). p_d tends to mark the ambiguous class more than the flipped sample, which this
    split shows; an empty group is left out."""
    flipped = scores["noisy"] != scores["clean"]
    affected = np.isin(scores["clean"], np.unique(scores["clean"][flipped]))
    bins = np.linspace(0, 1, 41)
    for mask, label, color in (
        (flipped, "flipped labels", "tab:red"),
        (~flipped & affected, "clean labels, classes with flips", "tab:orange"),
        (~flipped & ~affected, "clean labels, classes without flips", "tab:green"),
    ):
        if mask.any():
            ax.hist(
                p_d[mask], bins, alpha=0.55, color=color, density=True, label=f"{label} (n={int(mask.sum())})"
            )
    ax.set(xlabel="p_d of the training sample", ylabel="density", title="p_d: flipped vs clean labels")
    ax.legend(fontsize=8, loc="upper center")


def precision_panel(ax, curves: dict[str, np.ndarray], k_flipped: int) -> None:
    """precision@k (%) against k, one line per label -> (N,) curve, with k = k_flipped marked."""
    for label, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), 100 * curve, lw=2, label=label)
    ax.axvline(k_flipped, color="grey", ls="--", lw=1, label=f"k = number flipped ({k_flipped})")
    ax.set(
        xlabel="k (samples inspected, most suspect first)",
        ylabel="precision@k (%)",
        ylim=(0, 102),
        xlim=(1, min(len(next(iter(curves.values()))), 3 * k_flipped)),
        title="Flipped labels among the top k",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, title: str, path: Path, dpi: int = 120) -> None:
    """Titles, lays out, writes and closes `fig`."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
