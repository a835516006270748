"""`python -m train clean`: dataset cleaning. After training, rank every training sample by p_d (most
suspect first; the abstain output's probability of Drainage, Deep Gamblers and DAC) and by
self-confidence (1 - p(given label) over the C class outputs, the usual baseline, for every loss);
where the clean labels are known, report how well each ranking finds the flipped labels.

    python -m train clean                                   # digits, Drainage and CE, 40% asym noise, seed 1
    python -m train clean --seeds 1-5 --noise asym:0.4 sym:0.6 --out benchmarks/results/digits_cleaning
    python -m train clean --runs runs/<run> runs/<other>    # rank finished runs (their scores.npz)
    python -m train clean --tuning --seeds 101 102 --grid drainage:loss_params.alpha=0.03,1

Each run is `train run`'s (train/experiment.py: presets train/configs/<dataset>_<loss>.json), in
<runs_dir>/<loss>[<grid point>]/<noise>/s<seed>. Ranking and metrics: train/cleaning.py; into each run
folder go cleaning_ranked.csv (one row per training sample, ranked), cleaning.json and cleaning.png.
Metrics (drainage_fast.openset.cleaning_metrics): precision@k and recall@k at k = the number of flipped
labels (there precision = recall) and at --ks, and the AUROC of the score at separating flipped from
clean labels. The report: <out>.md, <out>.csv, <out>_runs.csv, <out>.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..arguments import several
from ..cleaning import SCORE_LABELS, finished_runs, mean_curves, result_rows, train_runs
from ..cli import SHARED_FLAGS, positive_int
from ..grid import best_points, distinct, job_dir, parse_noises, plan_runs, reproducing_command
from ..losses import LOSS_NAMES
from ..report import write_csv
from ..report.cleaning import plot_cleaning

FLAGS = SHARED_FLAGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="dataset of every run (default: digits)")
    several(
        p,
        "--losses",
        default=["drainage", "ce"],
        metavar="LOSS",
        help=f"losses to train: {LOSS_NAMES} (default: drainage ce)",
    )
    several(
        p,
        "--runs",
        default=None,
        metavar="RUN_DIR",
        help="finished runs to rank instead of training (any `train run` folder)",
    )
    several(p, "--ks", type=positive_int, default=[10, 50, 100], help="fixed k for precision / recall")


def write_report(
    rows: list[dict],
    runs: list[tuple[dict, Path]],
    out: Path,
    title: str,
    ks,
    *,
    select: bool = False,
    command: str = "",
) -> str:
    """The markdown table (and, with select, each loss's best grid point), CSVs and figure."""
    from ..report import aggregate, loss_label, pct, spread_over

    out.parent.mkdir(parents=True, exist_ok=True)
    fixed = [f"{kind}@{k}" for k in ks for kind in ("precision", "recall") if f"precision@{k}" in rows[0]]
    metrics = ["precision@k_flipped", *fixed, "AUROC"]
    agg = aggregate(rows, ["loss", "params", "noise", "score"], [*metrics, "num_flipped"])
    several = len({a["noise"] for a in agg}) > 1  # noise settings: named in the rows only then
    write_csv(out.with_name(out.name + "_runs.csv"), rows)
    write_csv(out.with_suffix(".csv"), agg)
    text = [
        f"# {title}",
        "",
        (
            "Every training sample ranked by a suspicion score, most suspect first: p_d (the probability of "
            "the abstain output: Drainage, Deep Gamblers, DAC) or self-confidence (1 - the closed-softmax "
            "probability of the given label, the usual baseline). k_flipped = the number of flipped labels "
            f"({agg[0]['num_flipped_mean']:.0f} on average), where precision = recall. AUROC: the score "
            f"separating flipped from clean labels. Values in %, {spread_over(agg[0]['n'], 'seed')}."
        ),
        "",
        "| model / score | precision@k_flipped | " + " | ".join(fixed) + " | AUROC |",
        "|---|" + "---:|" * (len(metrics)),
    ]
    for a in agg:
        name = (
            loss_label(a["loss"])
            + (f" [{a['params']}]" if a["params"] else "")
            + (f", {a['noise']}" if several else "")
            + f" / {SCORE_LABELS[a['score']]}"
        )
        text.append(f"| {name} | " + " | ".join(pct(a[f"{m}_mean"], a[f"{m}_std"]) for m in metrics) + " |")
    text.append("")
    if select and any(a["params"] for a in agg):
        text += [
            "## Selected: highest mean AUROC of each loss's own score (p_d for Drainage), over the "
            "noise settings",
            "",
        ]
        own = {a["loss"]: "p_d" for a in agg if a["score"] == "p_d"}
        chosen = best_points(
            agg, "loss", "AUROC_mean", keep=lambda a: a["score"] == own.get(a["loss"], "self_confidence")
        )
        text += [
            f"- {loss_label(loss)}: `{params or 'preset'}` (AUROC {100 * score:.2f})"
            for loss, (params, score) in chosen.items()
        ]
        text.append("")
    if command:
        text += ["## Reproduce", "", f"    {command}", ""]
    out.with_suffix(".md").write_text("\n".join(text))
    plot_report(runs, out.with_suffix(".png"), title)
    return "\n".join(text)


def plot_report(runs: list[tuple[dict, Path]], path: Path, title: str) -> None:
    """Mean precision@k curve per model / score over the runs; p_d histograms of the first run with an
    abstain output."""
    curves, k_flipped = mean_curves(runs)
    drainage = next((r for r in runs if "p_drain" in np.load(r[1] / "scores.npz")), None)
    histogram, seen = None, None
    if drainage:
        scores = dict(np.load(drainage[1] / "scores.npz"))
        histogram = (scores, scores["p_drain"])
        seen = f"p_d of the training samples ({drainage[1].parent.name}, seed {drainage[0]['seed']})"
    plot_cleaning(
        curves,
        k_flipped,
        histogram,
        path,
        title,
        curves_title="Flipped labels among the top k (mean over the seeds)",
        histogram_title=seen,
    )


def command_line(args, continue_in: Path | None = None) -> str:
    """The job as a command (the report's Reproduce line; with continue_in, its runs_dir: the command that
    continues it)."""
    if args.runs:
        return reproducing_command("clean", args, ["runs", "ks"])
    flags = ["dataset", "losses", "noise", "seeds", "ks", "tuning", "grid", "set"]
    return reproducing_command("clean", args, flags, continue_in=continue_in)


def main(args) -> int:
    from ..experiment import check_plan

    distinct("--ks", args.ks)  # before anything is trained
    if args.runs:
        runs = finished_runs(args.runs)
        # only the report goes there
        runs_dir = None if args.out else job_dir(args.runs_dir, f"clean-{args.dataset}")
    else:
        plan = plan_runs(
            args.dataset,
            args.losses,
            parse_noises(args.noise),
            args.seeds,
            tuning=args.tuning,
            grid=args.grid,
            overrides=args.set,
        )
        check_plan([run.cfg for run in plan])  # device, backend, dataset files: before the first folder
        runs_dir = job_dir(args.runs_dir, f"clean-{args.dataset}")
        runs = train_runs(plan, runs_dir, continue_with=command_line(args, continue_in=runs_dir))
    out = Path(args.out) if args.out else runs_dir / "cleaning"
    rows = result_rows(runs, args.ks)
    if not rows:
        print(f"no flipped labels in {[str(r) for _, r in runs]}: ranked CSVs written, nothing to score")
        return 0
    setting = (
        "finished runs"
        if args.runs
        else f"{', '.join(args.noise)} noise" + (", tuning split" if args.tuning else "")
    )
    title = f"{args.dataset}: finding flipped labels in the training set ({setting})"
    print(write_report(rows, runs, out, title, args.ks, select=args.tuning, command=command_line(args)))
    print(
        f"wrote {out}.md, {out}.csv, {out}_runs.csv, {out}.png; per run: cleaning_ranked.csv, "
        f"cleaning.json, cleaning.png in {sorted({str(r.parent) for _, r in runs})}"
    )
    return 0
