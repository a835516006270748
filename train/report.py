"""Tables and figures: mean +- std aggregation, markdown / CSV writers, the sweep and default-job plots.

One run has no spread: its std is nan, tables print its value alone (no "± 0.00") and error bars are
left out. Bars encode length from zero, so a bar axis starts at 0 or, zoomed in, carries a break mark
(bar_value_axis). matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

LOSS_LABELS = {"drainage": "Drainage", "ce": "CE", "gce": "GCE", "sce": "SCE", "nce_rce": "NCE+RCE",
               "anl_ce": "ANL-CE", "nce_agce": "NCE+AGCE", "anl_fl": "ANL-FL", "anl_ce_er": "ANL-CE-ER"}


def loss_label(name: str) -> str:
    return LOSS_LABELS.get(name, name.upper().replace("_", "+"))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1, as APL's statistics.stdev); nan-aware. The std of a
    single value is nan (undefined for ddof = 1), not 0."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
                   dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def aggregate(rows: list[dict], keys: list[str], metrics: list[str]) -> list[dict]:
    """One row per distinct `keys` value (in first-seen order) with <metric>_mean, <metric>_std, n."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        agg = dict(zip(keys, key), n=len(members))
        for m in metrics:
            agg[f"{m}_mean"], agg[f"{m}_std"] = mean_std(r.get(m) for r in members)
        out.append(agg)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def pct(mean: float, std: float | None = None, digits: int = 2, signed: bool = False) -> str:
    """100 * mean as text, "n/a" for nan; with " ± 100 * std" when std is a spread (not None, not the nan
    of a single run)."""
    if math.isnan(mean):
        return "n/a"
    text = f"{100 * mean:{'+' if signed else ''}.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {100 * std:.{digits}f}"


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


def markdown_grid(agg: list[dict], row_key: str, col_key: str, metric: str, bold_max: bool = True) -> str:
    """A markdown table: one row per row_key value, one column per col_key value, cells metric mean +- std
    in percent; the best mean of each column in bold."""
    rows = list(dict.fromkeys(a[row_key] for a in agg))
    cols = list(dict.fromkeys(a[col_key] for a in agg))
    cell = {(a[row_key], a[col_key]): a for a in agg}
    best = {c: max((cell[r, c][f"{metric}_mean"] for r in rows if (r, c) in cell), default=math.nan)
            for c in cols}
    lines = [f"| {row_key} | " + " | ".join(map(str, cols)) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            a = cell.get((r, c))
            text = pct(a[f"{metric}_mean"], a[f"{metric}_std"]) if a else ""
            cells.append(f"**{text}**" if a and bold_max and a[f"{metric}_mean"] == best[c] else text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(agg: list[dict], path: Path, title: str, metrics=(("last_eval_acc", "last epoch"),
                                                                   ("best_eval_acc", "best epoch"))) -> None:
    """Grouped bars: one group per noise setting (agg "noise"), one bar per series (agg "setting"), mean
    +- std; one panel per metric. Drainage bars are outlined."""
    plt = _pyplot()
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
            means = np.array([100 * cell[name, s][f"{metric}_mean"] if ok else np.nan
                              for s, ok in zip(settings, present)])
            stds = error_bars([100 * cell[name, s][f"{metric}_std"] if ok else 0
                               for s, ok in zip(settings, present)])
            lows.append(np.nanmin(means - stds))
            x = np.arange(len(settings)) + (i - (len(series) - 1) / 2) * width
            drainage = name.startswith("Drainage")
            ax.bar(x, means, width, yerr=stds, capsize=2, label=name, color=colors(i),
                   edgecolor="black" if drainage else "none", linewidth=1.2 if drainage else 0)
        ax.set_xticks(np.arange(len(settings)), settings)
        ax.set_xlabel("label noise (type:rate)")
        ax.set_ylabel(f"clean {split} accuracy (%)")
        ax.set_title(f"{label}, mean ± std over {agg[0]['n']} seeds" if agg[0]["n"] > 1 else
                     f"{label}, one seed")
        bar_value_axis(ax, min(lows), "y")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(series), 6), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * ((len(series) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_grid(agg: list[dict], path: Path, title: str, selected: dict[str, str],
              metric: str = "last_eval_acc") -> None:
    """A hyper-parameter sweep: one panel per loss, one row of horizontal bars per grid point (one bar per
    noise setting, mean +- std); the selected point's label is starred."""
    plt = _pyplot()
    losses = list(dict.fromkeys(a["loss"] for a in agg))
    settings = list(dict.fromkeys(a["noise"] for a in agg))
    cell = {(a["loss"], a["params"], a["noise"]): a for a in agg}
    points = {loss: list(dict.fromkeys(a["params"] for a in agg if a["loss"] == loss)) for loss in losses}
    cols = 2 if len(losses) > 1 else 1
    rows = -(-len(losses) // cols)
    heights = [max(len(points[loss]) for loss in losses[r * cols:(r + 1) * cols]) for r in range(rows)]
    panel_heights = [0.42 * h + 1.2 for h in heights]
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, sum(panel_heights)), squeeze=False,
                             gridspec_kw={"height_ratios": panel_heights})
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
    for ax in list(axes.flat)[len(losses):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{title}\n★ = selected: highest mean over the noise settings", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_default_job(runs: dict[str, dict], path: Path, title: str) -> None:
    """runs: loss -> {"history": [...], "scores": npz dict}. Three panels: clean test accuracy per epoch;
    mean p_d of clean vs flipped training samples per epoch; final p_d histogram (Drainage)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for loss, run in runs.items():
        h = run["history"]
        axes[0].plot([r["epoch"] for r in h], [100 * r["eval_acc"] for r in h], label=loss_label(loss), lw=2)
    axes[0].set(xlabel="epoch", ylabel="clean test accuracy (%)", title="Accuracy on the clean test set")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    drain = runs.get("drainage")
    if drain:
        h = drain["history"]
        epochs = [r["epoch"] for r in h]
        axes[1].plot(epochs, [r["pd_clean"] for r in h], label="clean-label samples", color="tab:green", lw=2)
        axes[1].plot(epochs, [r["pd_flipped"] for r in h], label="flipped-label samples", color="tab:red",
                     lw=2)
        axes[1].set(xlabel="epoch", ylabel="mean p_d", title="Drainage probability on the training set")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
        s = drain["scores"]
        flipped = s["noisy"] != s["clean"]
        # clean samples of a class that lost samples to flips look like the flipped ones to p_d (the
        # class itself is ambiguous); clean samples of untouched classes do not
        affected = np.isin(s["clean"], np.unique(s["clean"][flipped]))
        bins = np.linspace(0, 1, 41)
        groups = [(flipped, "flipped labels", "tab:red"),
                  (~flipped & affected, "clean labels, classes with flips", "tab:orange"),
                  (~flipped & ~affected, "clean labels, classes without flips", "tab:green")]
        for mask, label, color in groups:
            axes[2].hist(s["p_drain"][mask], bins, alpha=0.55, color=color, density=True,
                         label=f"{label} (n={int(mask.sum())})")
        axes[2].set(xlabel="p_d (drainage probability), last epoch", ylabel="density",
                    title="p_d of training samples")
        axes[2].legend(fontsize=8, loc="upper center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
