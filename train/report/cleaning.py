"""The cleaning figure (`train clean`): precision@k curves and p_d histograms of the training samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .figures import pd_histograms, precision_panel, pyplot, save_figure


def plot_cleaning(
    curves: dict[str, np.ndarray],
    k_flipped: int,
    histogram: tuple[dict, np.ndarray] | None,
    path: Path,
    title: str,
    *,
    curves_title: str | None = None,
    histogram_title: str | None = None,
) -> None:
    """Left: precision@k (label -> (N,) curve) with k = k_flipped marked; right: the p_d histograms of one
    run, histogram = (its scores.npz, its p_d), or an empty panel without one."""
    fig, axes = pyplot().subplots(1, 2, figsize=(13, 4.4))
    precision_panel(axes[0], curves, k_flipped)
    if curves_title:
        axes[0].set_title(curves_title)
    if histogram is not None:
        pd_histograms(axes[1], *histogram)
        if histogram_title:
            axes[1].set_title(histogram_title)
    else:
        axes[1].axis("off")
    save_figure(fig, title, path)
