"""Tables: loss labels, mean +- std aggregation over seeds, percent cells, markdown grids and the CSV
writer every command and run folder uses.

One run has no spread: its std is nan, and tables print its value alone (no "± 0.00").
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from drainage_fast.openset import REPORTED_COVERAGES

LOSS_LABELS = {
    "drainage": "Drainage",
    "gamblers": "Deep Gamblers",
    "dac": "DAC",
    "ce": "CE",
    "gce": "GCE",
    "sce": "SCE",
    "nce_rce": "NCE+RCE",
    "anl_ce": "ANL-CE",
    "nce_agce": "NCE+AGCE",
    "anl_fl": "ANL-FL",
    "anl_ce_er": "ANL-CE-ER",
}


def loss_label(name: str) -> str:
    return LOSS_LABELS.get(name, name.upper().replace("_", "+"))


def counted(n: int, noun: str) -> str:
    """ "1 seed", "3 seeds": reports once said "over 1 seeds"."""
    return f"{n} {noun}{'s' * (n != 1)}"


def spread_over(n: int, noun: str) -> str:
    """What a table's ± is taken over: "mean ± std over 3 seeds", or "one seed, no spread" for n = 1
    (one value has no std, see mean_std)."""
    return f"mean ± std over {counted(n, noun)}" if n > 1 else f"one {noun}, no spread"


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1, as APL's statistics.stdev); nan-aware. The std of a
    single value is nan (undefined for ddof = 1), not 0."""
    v = np.asarray(
        [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float
    )
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


def markdown_grid(agg: list[dict], row_key: str, col_key: str, metric: str, bold_max: bool = True) -> str:
    """A markdown table: one row per row_key value, one column per col_key value, cells metric mean +- std
    in percent; the best mean of each column in bold."""
    rows = list(dict.fromkeys(a[row_key] for a in agg))
    cols = list(dict.fromkeys(a[col_key] for a in agg))
    cell = {(a[row_key], a[col_key]): a for a in agg}
    best = {
        c: max((cell[r, c][f"{metric}_mean"] for r in rows if (r, c) in cell), default=math.nan) for c in cols
    }
    lines = [f"| {row_key} | " + " | ".join(map(str, cols)) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            a = cell.get((r, c))
            text = pct(a[f"{metric}_mean"], a[f"{metric}_std"]) if a else ""
            cells.append(f"**{text}**" if a and bold_max and a[f"{metric}_mean"] == best[c] else text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (summary / metrics-row key stem, header) of the selective-classification columns; the key of a
# confidence is "<stem>[<confidence>]", e.g. eval_risk@90[1-p_d] (train/trainer.py evaluation_metrics)
SELECTIVE_COLUMNS = [
    ("eval_aurc", "AURC"),
    ("eval_e_aurc", "E-AURC"),
    *((f"eval_risk@{100 * c:g}", f"risk@{100 * c:g}%") for c in REPORTED_COVERAGES),
]
CONFIDENCE_LABELS = {"1-p_d": "1 - p_d", "msp": "MSP"}


def selective_table(rows: list[tuple[str, str, dict]]) -> str:
    """A markdown table of AURC, E-AURC and the selective risk at each reported coverage, in %, one row
    per (label, confidence, values): values hold "<stem>[<confidence>]" (one run's summary) or its
    aggregate's "<stem>[<confidence>]_mean" / "_std" (mean ± std)."""

    def cell(values: dict, key: str) -> str:
        if f"{key}_mean" in values:
            return pct(values[f"{key}_mean"], values[f"{key}_std"])
        return pct(values.get(key, math.nan))

    lines = [
        "| model / confidence | " + " | ".join(h for _, h in SELECTIVE_COLUMNS) + " |",
        "|---|" + "---:|" * len(SELECTIVE_COLUMNS),
    ]
    for label, confidence, values in rows:
        cells = [cell(values, f"{stem}[{confidence}]") for stem, _ in SELECTIVE_COLUMNS]
        lines.append(f"| {label} / {CONFIDENCE_LABELS[confidence]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confidences_in(values: dict) -> list[str]:
    """The confidences a summary (or its aggregate) has selective metrics of: 1-p_d (models with an abstain
    output), then msp."""

    def known(key: str) -> bool:
        value = values.get(key, values.get(f"{key}_mean"))
        return value is not None and not math.isnan(value)

    return [c for c in CONFIDENCE_LABELS if known(f"eval_aurc[{c}]")]
