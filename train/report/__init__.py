"""Tables and figures of the commands' reports (train/commands/): tables.py (aggregation, percent
cells, markdown, CSV) and figures.py (pyplot() and the shared figures and panels), re-exported here;
openset.py (`train osr`, `train demo789`) and cleaning.py (`train clean`) are imported by name."""

from .figures import (
    bar_value_axis,
    error_bars,
    pd_histograms,
    plot_default_job,
    plot_grid,
    plot_risk_coverage,
    plot_sweep,
    precision_panel,
    pyplot,
    risk_coverage_panel,
    save_figure,
)
from .tables import (
    CONFIDENCE_LABELS,
    LOSS_LABELS,
    SELECTIVE_COLUMNS,
    aggregate,
    confidences_in,
    counted,
    loss_label,
    markdown_grid,
    mean_std,
    pct,
    selective_table,
    spread_over,
    write_csv,
)

__all__ = [
    "CONFIDENCE_LABELS",
    "LOSS_LABELS",
    "SELECTIVE_COLUMNS",
    "aggregate",
    "bar_value_axis",
    "confidences_in",
    "counted",
    "error_bars",
    "loss_label",
    "markdown_grid",
    "mean_std",
    "pct",
    "pd_histograms",
    "plot_default_job",
    "plot_grid",
    "plot_risk_coverage",
    "plot_sweep",
    "precision_panel",
    "pyplot",
    "risk_coverage_panel",
    "save_figure",
    "selective_table",
    "spread_over",
    "write_csv",
]
