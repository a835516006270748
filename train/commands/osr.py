"""`python -m train osr`: open-set recognition. Train on the known classes of each split, score the test
images of the known and unknown classes, report AUROC / OSCR (mean +- std over splits) per method and score.

    python -m train osr                                     # digits, 6 known / 4 unknown, splits 0-4
    python -m train osr --dataset mnist --splits 0 1 2 3 4 --set device=cuda
    python -m train osr --dataset cifar10 --methods ce drainage_const --split_files my_split.json
    python -m train osr --tuning --splits 100 101 102 --grid lr=0.01,0.03,0.1 drainage:loss_params.alpha=0.1,1
    python -m train osr --tuning --splits 100 --grid drainage_const:drainage_logit=0,4,40

Methods (train/openset/runs.py): ce, drainage_const (the paper's open-set variant: constant drainage logit,
alpha = beta = 1), drainage (learned drainage node) by default; any loss of `train sweep --losses` too
(gamblers and dac with a learned abstain node, scored by p_d; the others by msp). Each method starts from
the preset
train/configs/osr_<dataset>_<method>.json when there is one (the digits ones were chosen with --tuning),
else <dataset>_<loss>.json, with clean labels. Splits: train/openset/split_files/ (train/openset/splits.py); a
seeded split without a file there is written to <runs_dir>/splits/ (or --split_dir), never into the package.
Writes <out>.md, <out>.csv (mean +- std), <out>_runs.csv (one row per run and score), <out>.png, and
one run folder per run with scores.csv (every score of every evaluated image).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..arguments import several
from ..cli import SHARED_FLAGS
from ..grid import distinct, job_dir, reproducing_command, resolved_path
from ..openset.runs import (
    DEFAULT_METHODS,
    EXTRA_METRICS,
    METRICS,
    SCORE_LABELS,
    aggregate_scores,
    best_method_points,
    method_of,
    plan_open_set,
    run_plan,
    score_rows,
    setting_label,
)
from ..openset.splits import DATASET_CLASSES, SPLIT_DIR, load_split, save_split, seeded_splits
from ..report import counted, mean_std, pct, spread_over
from ..report.openset import plot_osr

FLAGS = tuple(flag for flag in SHARED_FLAGS if flag != "noise")  # open-set runs train on clean labels

# drainage_const's constant drainage logit when --drainage_logit is not given. Not a config key (the
# network never sees it), so it lives here; digits: chosen with --tuning, validation AUROC of p_d rose
# from 90.6 (c = 0) to 93.5 (c = 40) and fell beyond (benchmarks/results/tuning/digits_osr_tuning_stage3.md)
TUNED_DRAINAGE_LOGIT = {"digits": 40.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", default="digits", choices=sorted(DATASET_CLASSES), help="dataset (default: digits)"
    )
    several(
        p,
        "--methods",
        default=list(DEFAULT_METHODS),
        metavar="METHOD",
        help="open-set methods to train: drainage_const, or any loss of `train sweep --losses` (drainage, "
        "gamblers and dac learn an abstain node) (default: %(default)s)",
    )
    p.add_argument("--known", type=int, default=6, help="known classes per seeded split (default 6)")
    several(
        p,
        "--splits",
        type=int,
        default=[0, 1, 2, 3, 4],
        metavar="SEED",
        help="seeded splits (default 0-4), read from --split_dir when their file is there",
    )
    several(
        p,
        "--split_files",
        default=None,
        metavar="JSON",
        help="split files to use instead of --splits (e.g. a published split)",
    )
    p.add_argument(
        "--split_dir",
        default=None,
        help=f"where seeded split files are read from (default: {SPLIT_DIR}) and new ones written "
        "(default: <runs_dir>/splits)",
    )
    p.add_argument(
        "--drainage_logit",
        type=float,
        default=None,
        help="the constant drainage logit of drainage_const (default: tuned for digits, 40; else 0)",
    )
    p.add_argument(
        "--unknown_train",
        choices=["drop", "relabel"],
        default="drop",
        help="unknown-class training images: removed (OSR, default) or relabelled at random",
    )
    p.add_argument("--title", default=None, help="report title (default: dataset, classes and splits)")


def splits_from(args) -> tuple[list, list]:
    """(the splits to run, the seeded ones without a file yet: the command saves them beside its results)."""
    if args.split_files:
        return [load_split(path) for path in distinct("--split_files", args.split_files, resolved_path)], []
    return seeded_splits(args.dataset, args.known, distinct("--splits", args.splits), args.split_dir)


def metrics_table(agg: list[dict]) -> str:
    names = [*METRICS, *EXTRA_METRICS]
    lines = ["| method / score | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for a in agg:
        cells = [pct(a[f"{m}_mean"], a[f"{m}_std"]) for m in names]
        lines.append(f"| {a['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_split_table(rows: list[dict], metric: str = "AUROC") -> str:
    splits = list(dict.fromkeys(r["split"] for r in rows))
    cells: dict[str, dict[str, list]] = {}
    for r in rows:
        label = setting_label(r["method"], r["score"]) + (f" [{r['params']}]" if r["params"] else "")
        cells.setdefault(label, {}).setdefault(r["split"], []).append(r[metric])
    lines = ["| method / score | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for label, by_split in cells.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * np.mean(by_split[s]):.2f}" for s in splits) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict], metric: str = "AUROC") -> str:
    """Each setting minus CE / MSP on the same split and seed (the splits differ more than the methods);
    empty unless exactly one CE / MSP setting ran."""
    baselines = {r["params"] for r in rows if (r["method"], r["score"]) == ("ce", "msp")}
    if len(baselines) != 1:
        return ""
    base = {(r["split"], r["seed"]): r[metric] for r in rows if (r["method"], r["score"]) == ("ce", "msp")}
    diffs: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] != "ce" and (r["split"], r["seed"]) in base:
            label = setting_label(r["method"], r["score"]) + (f" [{r['params']}]" if r["params"] else "")
            diffs.setdefault(label, []).append(r[metric] - base[r["split"], r["seed"]])
    lines = [f"| method / score | {metric} minus CE / MSP (points) | runs where higher |", "|---|---:|---:|"]
    for label, d in diffs.items():
        lines.append(f"| {label} | {pct(*mean_std(d), signed=True)} | {sum(x > 0 for x in d)} / {len(d)} |")
    return "\n".join(lines)


def write_report(runs: list[dict], splits: list, out: Path, title: str, command: str) -> str:
    from ..report import write_csv

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = score_rows(runs)
    agg = aggregate_scores(rows)
    write_csv(out.with_name(out.name + "_runs.csv"), rows)
    write_csv(out.with_suffix(".csv"), agg)
    split_eval = agg[0]["eval_split"]
    text = [
        f"# {title}",
        "",
        (
            f"Evaluated on the {split_eval} images of all classes: known-class images give closed-set "
            f"accuracy, "
            "unknown-class ones must be rejected. Every score is an outlier score (higher = more likely "
            "unknown; drainage_fast.openset): p_d = drainage probability of the open softmax over all K "
            "outputs, MSP = 1 - max softmax over the C class outputs, max-logit, energy (- logsumexp of the "
            "class logits). AUROC does not depend on which class is positive; FPR@95TPR is given in both "
            "conventions (unknown-positive: known images flagged when 95% of the unknown are; "
            "known-positive: unknown images accepted when 95% of the known are). OSCR: area under "
            "correct-classification rate vs false-positive rate. Drained = argmax over all K outputs is "
            f"the drainage node. All values in %, {spread_over(agg[0]['n'], 'run')} (splits x training "
            "seeds)."
        ),
        "",
        "Splits (known / unknown classes):",
        "",
    ]
    text += [f"- `{s.tag}`: known {list(s.known)}, unknown {list(s.unknown)}" for s in splits]
    text += ["", "## Mean ± std", "", metrics_table(agg), ""]
    paired = paired_table(rows)
    if paired:
        text += ["## Paired with CE / MSP (same split and seed)", "", paired, ""]
    text += ["## AUROC per split", "", per_split_table(rows), ""]
    if split_eval == "val" and any(a["params"] for a in agg):  # never choose on the test set
        chosen = best_method_points(agg)
        text += [
            (
                f"## Selected: highest mean {split_eval} AUROC of each method's own score "
                f"({', '.join(f'{m}: {SCORE_LABELS[method_of(m).primary_score]}' for m in chosen)})"
            ),
            "",
        ]
        text += [
            f"- {method_of(m).label}: `{params or 'preset'}` (AUROC {100 * score:.2f})"
            for m, (params, score) in chosen.items()
        ]
        text.append("")
    text += ["## Reproduce", "", f"    {command}", ""]
    out.with_suffix(".md").write_text("\n".join(text))
    plot_osr(agg, rows, out.with_suffix(".png"), title)
    return "\n".join(text)


def command_line(args, continue_in: Path | None = None) -> str:
    """The job as a command (the report's Reproduce line; with continue_in, its runs_dir: the command that
    continues it)."""
    splits = ["split_files"] if args.split_files else ["known", "splits"]
    flags = [
        "dataset",
        "methods",
        *splits,
        "seeds",
        "drainage_logit",
        "unknown_train",
        "tuning",
        "grid",
        "set",
    ]
    return reproducing_command("osr", args, flags, continue_in=continue_in)


def main(args) -> int:
    splits, new_splits = splits_from(args)
    overrides = [*(["tuning=true"] if args.tuning else []), *args.set]
    logit = args.drainage_logit
    if logit is None:
        logit = TUNED_DRAINAGE_LOGIT.get(args.dataset, 0.0)
    plan = plan_open_set(
        args.dataset,
        args.methods,
        splits,
        args.seeds,
        grid=args.grid,
        overrides=overrides,
        drainage_logit=logit,
    )
    runs_dir = job_dir(args.runs_dir, f"osr-{args.dataset}")
    for split in new_splits:
        save_split(split, Path(args.split_dir or runs_dir / "splits") / f"{split.tag}.json")
    out = Path(args.out) if args.out else runs_dir / "osr"
    continue_with = command_line(args, continue_in=runs_dir)
    runs = run_plan(plan, runs_dir, unknown_train=args.unknown_train, continue_with=continue_with)
    k, u = len(splits[0].known), len(splits[0].unknown)
    evaluated = "validation split, tuning" if args.tuning else "test set"
    title = args.title or (
        f"{args.dataset}: open-set recognition, {k} known / {u} unknown classes, "
        f"{counted(len(splits), 'split')} ({evaluated})"
    )
    print(write_report(runs, splits, out, title, command_line(args)))
    print(f"wrote {out}.md, {out}.csv, {out}_runs.csv, {out}.png; runs (with scores.csv) in {runs_dir}")
    return 0
