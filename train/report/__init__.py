"""Tables and figures of the commands' reports (train/commands/): tables.py (aggregation, percent
cells, markdown, CSV) and figures.py (pyplot() and the shared figures and panels), re-exported here;
openset.py (`train osr`, `train demo789`) and cleaning.py (`train clean`) are imported by name."""

from .figures import (
    bar_value_axis,
    error_bars,
    pd_histograms,
    plot_default_job,
    plot_grid,
    plot_sweep,
    precision_panel,
    pyplot,
    save_figure,
)
from .tables import (
    LOSS_LABELS,
    aggregate,
    counted,
    loss_label,
    markdown_grid,
    mean_std,
    pct,
    spread_over,
    write_csv,
)

__all__ = [
    "LOSS_LABELS",
    "aggregate",
    "bar_value_axis",
    "counted",
    "error_bars",
    "loss_label",
    "markdown_grid",
    "mean_std",
    "pct",
    "pd_histograms",
    "plot_default_job",
    "plot_grid",
    "plot_sweep",
    "precision_panel",
    "pyplot",
    "save_figure",
    "spread_over",
    "write_csv",
]
