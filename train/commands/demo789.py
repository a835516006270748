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
import csv
from pathlib import Path

import numpy as np

from ..cli import SHARED_FLAGS
from ..grid import job_dir, reproducing_command
from ..openset.runs import METHODS, aggregate_scores, best_method_points, plan_open_set, run_plan, score_rows
from ..openset.splits import SPLIT_DIR, load_split
from ..report import aggregate, pct, pyplot, save_figure, write_csv

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
    p.add_argument("--methods", nargs="+", default=["drainage", "ce"], choices=list(METHODS),
                   help="methods to train (default: drainage ce)")


def run_row(run: dict) -> dict:
    """The demo's numbers of one run (nan where the method has no drainage node)."""
    train = run["training_set"]
    row = {"method": run["method"], "params": run["params"], "seed": run["seed"],
           "closed_set_accuracy": run["closed_set_accuracy"],
           "drained_known": run.get("drained_known", np.nan),
           "drained_unknown": run.get("drained_unknown", np.nan),
           "precision_at_k_pd": train.get("precision_at_k_pd", np.nan),
           "precision_at_k_self_conf": train["precision_at_k_self_conf"],
           "memorized_frac": train["memorized_frac"]}
    for score in ("p_d", "msp", "energy"):
        row[f"auroc_{score}"] = run["scores"][score]["AUROC"] if score in run["scores"] else np.nan
    return row


def read_dump(run_dir: str | Path) -> dict[str, np.ndarray]:
    with open(Path(run_dir) / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def drained_per_class(run_dir: str | Path, num_classes: int = 10) -> np.ndarray:
    """(num_classes,) fraction of the evaluated images of each true class that the drainage node takes."""
    dump = read_dump(run_dir)
    labels, drained = dump["label"].astype(int), dump["drained"].astype(int)
    return np.array([drained[labels == c].mean() for c in range(num_classes)])


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
        axes[0].set(xticks=range(10), xlabel=f"true class of the {split} image", ylim=(0, 100),
                    ylabel="drained (%): argmax is the drainage node",
                    title=f"Drainage: {split} images drained per class\n(red: 7/8/9, relabelled in training; "
                          f"mean ± std over {len(drainage)} runs)")
        axes[0].grid(axis="y", alpha=0.3)
    for ax, method, score, name in ((axes[1], "drainage", "p_d", "p_d (drainage probability)"),
                                    (axes[2], "ce", "msp", "1 - max softmax (MSP outlier score)")):
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            ax.axis("off")
            continue
        dumps = [read_dump(r["run_dir"]) for r in mine]
        values = np.concatenate([d[score].astype(float) for d in dumps])
        unknown = np.concatenate([d["set"] == "unknown" for d in dumps])
        bins = np.linspace(0, 1, 41)
        ax.hist(values[~unknown], bins, alpha=0.6, color="tab:green", density=True, label=f"{split} 0-6")
        ax.hist(values[unknown], bins, alpha=0.6, color="tab:red", density=True, label=f"{split} 7/8/9")
        auroc = np.mean([r["scores"][score]["AUROC"] for r in mine])
        ax.set(xlabel=name, ylabel="density", yscale="log",
               title=f"{METHODS[method].label}: AUROC {100 * auroc:.1f}% ({len(mine)} runs pooled)")
        ax.legend()
    save_figure(fig, title, path)


def write_report(runs: list[dict], out: Path, title: str, command: str) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [run_row(r) for r in runs]
    keys = [k for k, _ in COLUMNS]
    agg = aggregate(rows, ["method", "params"], keys)
    write_csv(out.with_name(out.name + "_runs.csv"), rows)
    write_csv(out.with_suffix(".csv"), agg)
    split = runs[0]["eval_split"]
    headers = [h.format(split=split) for _, h in COLUMNS]
    text = [f"# {title}", "", (
        "Training: every digit 7, 8 and 9 relabelled uniformly at random to one of 0-6 (seeded); 7-class "
        f"models. {split.capitalize()}: 0-6 are known, 7/8/9 are what no class output can name. Drained = "
        "argmax over all K outputs is the drainage node; AUROC = telling 7/8/9 from 0-6 by the score "
        "(drainage_fast.openset); precision@k on the training set: share of relabelled 7/8/9 among the k "
        "images with the highest score, k = their number. Values in %, mean ± std over "
        f"{agg[0]['n']} seeds (relabelling draw and training)."), "",
        "| method | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for a in agg:
        name = METHODS[a["method"]].label + (f" [{a['params']}]" if a["params"] else "")
        text.append(f"| {name} | " + " | ".join(pct(a[f"{k}_mean"], a[f"{k}_std"]) for k in keys) + " |")
    text.append("")
    shown = runs
    if split == "val" and any(a["params"] for a in agg):  # never choose on the test set
        chosen = best_method_points(aggregate_scores(score_rows(runs)))
        text += [f"## Selected: highest mean {split} AUROC of each method's own score (the figure "
                 "shows these)", ""]
        text += [f"- {METHODS[m].label}: `{p or 'preset'}` (AUROC {100 * s:.2f})"
                 for m, (p, s) in chosen.items()]
        text.append("")
        shown = [r for r in runs if r["params"] == chosen[r["method"]][0]]
    text += ["## Reproduce", "", f"    {command}", ""]
    out.with_suffix(".md").write_text("\n".join(text))
    plot_demo(shown, out.with_suffix(".png"), title)
    return "\n".join(text)


def command_line(args) -> str:
    return reproducing_command("demo789", args, ["methods", "seeds", "tuning", "grid", "set"])


def main(args) -> int:
    overrides = [*(["tuning=true"] if args.tuning else []), *args.set]
    plan = plan_open_set("digits", args.methods, [load_split(SPLIT_FILE)], args.seeds, grid=args.grid,
                         overrides=overrides, preset_prefix="demo789")
    runs_dir = job_dir(args.runs_dir, "demo789")
    out = Path(args.out) if args.out else runs_dir / "demo789"
    runs = run_plan(plan, runs_dir, unknown_train="relabel")
    title = (f"digits: training 7/8/9 relabelled at random to 0-6 "
             f"({'validation split, tuning' if args.tuning else 'test set'})")
    print(write_report(runs, out, title, command_line(args)))
    print(f"wrote {out}.md, {out}.csv, {out}_runs.csv, {out}.png; runs (with scores.csv) in {runs_dir}")
    return 0
