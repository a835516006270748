"""`python -m train demo789`: the paper's systematic-mislabel demonstration on digits.

Every training image of the digits 7, 8 and 9 is relabelled uniformly at random to one of 0-6 (seeded),
and a 7-class model is trained on that. Does the drainage node take the test 7, 8 and 9 (which no
class output can name correctly) and leave the test 0-6 alone? Reported per method, mean +- std over
seeds: closed-set accuracy on test 0-6, the fraction of test 0-6 and of test 7/8/9 whose argmax over all
K outputs is the drainage node, the AUROC of p_d (and of MSP) at telling test 7/8/9 from 0-6, and on
the training set the precision@k of p_d at finding the relabelled 7/8/9 (k = their number).

    python -m train demo789                                  # Drainage and CE, seed 1
    python -m train demo789 --seeds 1 2 3 4 5 --out benchmarks/results/digits_789
    python -m train demo789 --tuning --seeds 101 102 --grid lr=0.01,0.03,0.1 drainage:loss_params.alpha=0.1,1

Hyper-parameters: train/configs/demo789_digits_<method>.json (chosen with --tuning: validation images,
never the test set). The split is train/openset/split_files/digits_789.json; the runs go
through train/openset/runs.py with unknown_train="relabel", so every run folder has scores.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..arguments import several
from ..cli import SHARED_FLAGS
from ..grid import job_dir, reproducing_command
from ..openset.runs import (
    aggregate_scores,
    best_method_points,
    drained_per_class,
    method_of,
    plan_open_set,
    read_scores_csv,
    run_plan,
    score_rows,
)
from ..openset.splits import SPLIT_DIR, load_split
from ..report import aggregate, pct, spread_over, write_csv
from ..report.openset import plot_demo

FLAGS = tuple(flag for flag in SHARED_FLAGS if flag != "noise")  # the relabelling is the noise

SPLIT_FILE = SPLIT_DIR / "digits_789.json"
COLUMNS = [  # (key in the run row, header)
    ("closed_set_accuracy", "accuracy on {split} 0-6"),
    ("drained_known", "drained {split} 0-6"),
    ("drained_unknown", "drained {split} 7/8/9"),
    ("auroc_p_d", "AUROC p_d"),
    ("auroc_msp", "AUROC MSP"),
    ("auroc_energy", "AUROC energy"),
    ("precision_at_k_pd", "precision@k p_d, training 7/8/9"),
    ("precision_at_k_self_conf", "precision@k self-confidence, training 7/8/9"),
    ("memorized_frac", "training 7/8/9 fitted to their random label"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    several(
        p,
        "--methods",
        default=["drainage", "ce"],
        metavar="METHOD",
        help="methods to train: drainage_const or any loss of `train sweep --losses` (default: drainage ce)",
    )


def run_row(run: dict) -> dict:
    """The demo's numbers of one run (nan where the method has no drainage node)."""
    train = run["training_set"]
    row = {
        "method": run["method"],
        "params": run["params"],
        "seed": run["seed"],
        "closed_set_accuracy": run["closed_set_accuracy"],
        "drained_known": run.get("drained_known", np.nan),
        "drained_unknown": run.get("drained_unknown", np.nan),
        "precision_at_k_pd": train.get("precision_at_k_pd", np.nan),
        "precision_at_k_self_conf": train["precision_at_k_self_conf"],
        "memorized_frac": train["memorized_frac"],
    }
    for score in ("p_d", "msp", "energy"):
        row[f"auroc_{score}"] = run["scores"][score]["AUROC"] if score in run["scores"] else np.nan
    return row


def write_report(runs: list[dict], out: Path, title: str, command: str) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [run_row(r) for r in runs]
    keys = [k for k, _ in COLUMNS]
    agg = aggregate(rows, ["method", "params"], keys)
    write_csv(out.with_name(out.name + "_runs.csv"), rows)
    write_csv(out.with_suffix(".csv"), agg)
    split = runs[0]["eval_split"]
    headers = [h.format(split=split) for _, h in COLUMNS]
    text = [
        f"# {title}",
        "",
        (
            "Training: every digit 7, 8 and 9 relabelled uniformly at random to one of 0-6 (seeded); 7-class "
            f"models. {split.capitalize()}: 0-6 are known, 7/8/9 are what no class output can name. "
            "Drained = "
            "argmax over all K outputs is the drainage node; AUROC = telling 7/8/9 from 0-6 by the score "
            "(drainage_fast.openset); precision@k on the training set: share of relabelled 7/8/9 among the k "
            "images with the highest score, k = their number. Values in %, "
            f"{spread_over(agg[0]['n'], 'seed')} (relabelling draw and training)."
        ),
        "",
        "| method | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(headers),
    ]
    for a in agg:
        name = method_of(a["method"]).label + (f" [{a['params']}]" if a["params"] else "")
        text.append(f"| {name} | " + " | ".join(pct(a[f"{k}_mean"], a[f"{k}_std"]) for k in keys) + " |")
    text.append("")
    shown = runs
    if split == "val" and any(a["params"] for a in agg):  # never choose on the test set
        chosen = best_method_points(aggregate_scores(score_rows(runs)))
        text += [
            f"## Selected: highest mean {split} AUROC of each method's own score (the figure shows these)",
            "",
        ]
        text += [
            f"- {method_of(m).label}: `{p or 'preset'}` (AUROC {100 * s:.2f})" for m, (p, s) in chosen.items()
        ]
        text.append("")
        shown = [r for r in runs if r["params"] == chosen[r["method"]][0]]
    text += ["## Reproduce", "", f"    {command}", ""]
    out.with_suffix(".md").write_text("\n".join(text))
    plot_demo(*figure_data(shown), split, out.with_suffix(".png"), title)
    return "\n".join(text)


# the figure's histogram panels: (method, score, axis label)
PANELS = (
    ("drainage", "p_d", "p_d (drainage probability)"),
    ("ce", "msp", "1 - max softmax (MSP outlier score)"),
)


def figure_data(runs: list[dict]) -> tuple[np.ndarray | None, list[tuple]]:
    """What plot_demo draws, read from the runs' scores.csv: the drained share per true class of the
    drainage runs (None without one), and a histogram panel per method of PANELS that ran."""
    drainage = [r for r in runs if r["method"] == "drainage"]
    drained = np.array([drained_per_class(r["run_dir"]) for r in drainage]) if drainage else None
    panels = []
    for method, score, name in PANELS:
        mine = [r for r in runs if r["method"] == method]
        if mine:
            dumps = [read_scores_csv(r["run_dir"]) for r in mine]
            values = np.concatenate([d[score].astype(float) for d in dumps])
            unknown = np.concatenate([d["set"] == "unknown" for d in dumps])
            auroc = np.mean([r["scores"][score]["AUROC"] for r in mine])
            title = f"{method_of(method).label}: AUROC {100 * auroc:.1f}% ({len(mine)} runs pooled)"
            panels.append((name, values[~unknown], values[unknown], title))
    return drained, panels


def command_line(args, continue_in: Path | None = None) -> str:
    """The job as a command (the report's Reproduce line; with continue_in, its runs_dir: the command that
    continues it)."""
    return reproducing_command(
        "demo789", args, ["methods", "seeds", "tuning", "grid", "set"], continue_in=continue_in
    )


def main(args) -> int:
    overrides = [*(["tuning=true"] if args.tuning else []), *args.set]
    plan = plan_open_set(
        "digits",
        args.methods,
        [load_split(SPLIT_FILE)],
        args.seeds,
        grid=args.grid,
        overrides=overrides,
        preset_prefix="demo789",
    )
    runs_dir = job_dir(args.runs_dir, "demo789")
    out = Path(args.out) if args.out else runs_dir / "demo789"
    continue_with = command_line(args, continue_in=runs_dir)
    runs = run_plan(plan, runs_dir, unknown_train="relabel", continue_with=continue_with)
    title = (
        f"digits: training 7/8/9 relabelled at random to 0-6 "
        f"({'validation split, tuning' if args.tuning else 'test set'})"
    )
    print(write_report(runs, out, title, command_line(args)))
    print(f"wrote {out}.md, {out}.csv, {out}_runs.csv, {out}.png; runs (with scores.csv) in {runs_dir}")
    return 0
