"""`python -m train clean`: dataset cleaning. After training, rank every training sample by p_d (most
suspect first) and by self-confidence (1 - p(given label) over the C class outputs, the usual baseline);
where the clean labels are known, report how well each ranking finds the flipped labels.

    python -m train clean                                   # digits, Drainage and CE, 40% asym noise, seed 1
    python -m train clean --seeds 1-5 --noise asym:0.4 sym:0.6 --out benchmarks/results/digits_cleaning
    python -m train clean --runs runs/<run> runs/<other>    # rank finished runs (their scores.npz)
    python -m train clean --tuning --seeds 101 102 --grid drainage:loss_params.alpha=0.03,1

Each run is `train run`'s (train/experiment.py: presets train/configs/<dataset>_<loss>.json), in
<runs_dir>/<loss>[<grid point>]/<noise>/s<seed>; into its folder go cleaning_ranked.csv (one row per training
sample, ranked), cleaning.json and cleaning.png.
Metrics (drainage_fast.openset.cleaning_metrics): precision@k and recall@k at k = the number of flipped
labels (there precision = recall) and at --ks, and the AUROC of the score at separating flipped from
clean labels. The report: <out>.md, <out>.csv, <out>_runs.csv, <out>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from drainage_fast.openset import cleaning_metrics, precision_curve

from ..cli import SHARED_FLAGS, positive_int
from ..grid import PlannedRun, best_points, job_dir, parse_noise, plan_runs, point_tag, reproducing_command
from ..report import pd_histograms, precision_panel, pyplot, save_figure, write_csv
from ..run_dirs import UserError

FLAGS = SHARED_FLAGS

SCORE_LABELS = {"p_d": "p_d", "self_confidence": "self-confidence"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="dataset of every run (default: digits)")
    p.add_argument("--losses", nargs="+", default=["drainage", "ce"],
                   help="losses to train (default: drainage ce)")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN_DIR",
                   help="finished runs to rank instead of training (any `train run` folder)")
    p.add_argument("--ks", nargs="+", type=positive_int, default=[10, 50, 100],
                   help="fixed k for precision / recall")


def suspicion_scores(scores: dict) -> dict[str, np.ndarray]:
    """Higher = more suspect: p_d (drainage models) and 1 - p(given label)."""
    out = {"p_d": scores["p_drain"]} if "p_drain" in scores else {}
    return out | {"self_confidence": 1.0 - scores["p_given"]}


def ranked_rows(scores: dict, suspicion: dict[str, np.ndarray]) -> list[dict]:
    """One row per training sample, most suspect first by the first score (p_d when there is one)."""
    first = next(iter(suspicion))
    order = np.argsort(-suspicion[first], kind="stable")
    ranks = {s: np.empty(len(v), dtype=np.int64) for s, v in suspicion.items()}
    for s, v in suspicion.items():
        ranks[s][np.argsort(-v, kind="stable")] = np.arange(1, len(v) + 1)
    flipped = scores["noisy"] != scores["clean"]
    return [{"rank": r + 1, "index": int(scores["index"][i]), "given_label": int(scores["noisy"][i]),
             "clean_label": int(scores["clean"][i]), "flipped": int(flipped[i]),
             "pred": int(scores["pred"][i]),
             **{s: float(v[i]) for s, v in suspicion.items()},
             **{f"rank_{s}": int(ranks[s][i]) for s in suspicion if s != first}}
            for r, i in enumerate(order)]


def rank_run(run_dir: str | Path, ks=(10, 50, 100)) -> dict:
    """Ranks a finished run's training set (run_dir/scores.npz); writes cleaning_ranked.csv, and with known
    flips cleaning.json and cleaning.png.
    Returns {"num_samples", "num_flipped", "scores": {score: metrics}}."""
    run_dir = Path(run_dir)
    scores = dict(np.load(run_dir / "scores.npz"))
    suspicion = suspicion_scores(scores)
    write_csv(run_dir / "cleaning_ranked.csv", ranked_rows(scores, suspicion))
    flipped = scores["noisy"] != scores["clean"]
    n, k_flipped = len(flipped), int(flipped.sum())
    result = {"num_samples": n, "num_flipped": k_flipped, "scores": {}}
    if 0 < k_flipped < n:
        for s, v in suspicion.items():
            m = cleaning_metrics(v, flipped, ks=sorted({k_flipped, *(k for k in ks if k <= n)}))
            m["precision@k_flipped"] = m[f"precision@{k_flipped}"]
            result["scores"][s] = m
        if "p_d" in suspicion:
            result["pd_clean"] = float(suspicion["p_d"][~flipped].mean())
            result["pd_flipped"] = float(suspicion["p_d"][flipped].mean())
        plot_run(scores, suspicion, run_dir / "cleaning.png",
                 f"{run_dir.name}: {k_flipped} of {n} labels flipped")
    (run_dir / "cleaning.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def plot_run(scores: dict, suspicion: dict, path: Path, title: str) -> None:
    flipped = scores["noisy"] != scores["clean"]
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.2))
    precision_panel(axes[0], {SCORE_LABELS[s]: precision_curve(v, flipped) for s, v in suspicion.items()},
                     int(flipped.sum()))
    if "p_d" in suspicion:
        pd_histograms(axes[1], scores, suspicion["p_d"])
    else:
        axes[1].axis("off")
    save_figure(fig, title, path)


def train_runs(plan: list[PlannedRun], runs_dir: Path) -> list[tuple[dict, Path]]:
    """Trains every planned run under runs_dir/<loss>[<params>]/<noise>/s<seed>, reusing a finished run of
    the same config (experiment.reuse_or_claim); [(labels, run_dir)]."""
    from ..experiment import reuse_or_claim, run_experiment

    done = []
    for run in plan:
        labels, cfg = run.labels, run.cfg
        run_dir, reused, notes = reuse_or_claim(runs_dir / run.folder, f"s{run.seed}", cfg)
        for note in notes:
            print(note, flush=True)
        if not reused:
            run_experiment(cfg, run_dir, quiet=True, progress=False)
        done.append((labels, run_dir))
        print(f"{'reused (finished, same config)' if reused else 'trained'} {run_dir}", flush=True)
    return done


def finished_runs(paths: list[str]) -> list[tuple[dict, Path]]:
    """[(labels, run_dir)] for `train run` folders; runs of the same loss and loss parameters (seeds)
    are aggregated together. A folder without config.json and scores.npz is a UserError."""
    runs = []
    for path in map(Path, paths):
        missing = [name for name in ("config.json", "scores.npz") if not (path / name).is_file()]
        if missing:
            raise UserError(f"--runs {path}: not a finished run folder (no {', '.join(missing)})")
        cfg = json.loads((path / "config.json").read_text())
        noise = f"{cfg['noise_type']}:{cfg['noise_rate']:g}"
        runs.append(({"loss": cfg["loss"], "params": point_tag(cfg["loss_params"]), "noise": noise,
                      "seed": cfg["seed"]}, path))
    return runs


def result_rows(runs: list[tuple[dict, Path]], ks) -> list[dict]:
    rows = []
    for labels, run_dir in runs:
        result = rank_run(run_dir, ks)
        for score, m in result["scores"].items():
            rows.append({**labels, "score": score, "num_flipped": result["num_flipped"], **m,
                         "run_dir": str(run_dir)})
    return rows


def write_report(rows: list[dict], runs: list[tuple[dict, Path]], out: Path, title: str, ks, *,
                 select: bool = False, command: str = "") -> str:
    """The markdown table (and, with select, each loss's best grid point), CSVs and figure."""
    from ..report import aggregate, loss_label, pct

    out.parent.mkdir(parents=True, exist_ok=True)
    fixed = [f"{kind}@{k}" for k in ks for kind in ("precision", "recall") if f"precision@{k}" in rows[0]]
    metrics = ["precision@k_flipped", *fixed, "AUROC"]
    agg = aggregate(rows, ["loss", "params", "noise", "score"], [*metrics, "num_flipped"])
    several = len({a["noise"] for a in agg}) > 1  # noise settings: named in the rows only then
    write_csv(out.with_name(out.name + "_runs.csv"), rows)
    write_csv(out.with_suffix(".csv"), agg)
    text = [f"# {title}", "", (
        "Every training sample ranked by a suspicion score, most suspect first: p_d (the drainage "
        "probability; Drainage only) or self-confidence (1 - the closed-softmax probability of the given "
        "label, the usual baseline). k_flipped = the number of flipped labels "
        f"({agg[0]['num_flipped_mean']:.0f} on average), where precision = recall. AUROC: the score "
        "separating flipped from clean labels. Values in %, mean ± std over "
        f"{agg[0]['n']} seeds."), "",
        "| model / score | precision@k_flipped | " + " | ".join(fixed) + " | AUROC |",
        "|---|" + "---:|" * (len(metrics))]
    for a in agg:
        name = (loss_label(a["loss"]) + (f" [{a['params']}]" if a["params"] else "")
                + (f", {a['noise']}" if several else "") + f" / {SCORE_LABELS[a['score']]}")
        text.append(f"| {name} | " + " | ".join(pct(a[f"{m}_mean"], a[f"{m}_std"]) for m in metrics) + " |")
    text.append("")
    if select and any(a["params"] for a in agg):
        text += ["## Selected: highest mean AUROC of each loss's own score (p_d for Drainage), over the "
                 "noise settings", ""]
        own = {a["loss"]: "p_d" for a in agg if a["score"] == "p_d"}
        chosen = best_points(agg, "loss", "AUROC_mean", keep=lambda a: a["score"] == own.get(a["loss"],
                                                                                             "self_confidence"))
        text += [f"- {loss_label(loss)}: `{params or 'preset'}` (AUROC {100 * score:.2f})"
                 for loss, (params, score) in chosen.items()]
        text.append("")
    if command:
        text += ["## Reproduce", "", f"    {command}", ""]
    out.with_suffix(".md").write_text("\n".join(text))
    plot_report(rows, runs, out.with_suffix(".png"), title)
    return "\n".join(text)


def plot_report(rows: list[dict], runs: list[tuple[dict, Path]], path: Path, title: str) -> None:
    """Mean precision@k curve per model / score over the runs; p_d histograms of the first Drainage run."""
    from ..report import loss_label

    fig, axes = pyplot().subplots(1, 2, figsize=(13, 4.4))
    several = len({labels["noise"] for labels, _ in runs}) > 1
    curves, k_flipped = {}, []
    for labels, run_dir in runs:
        scores = dict(np.load(run_dir / "scores.npz"))
        flipped = scores["noisy"] != scores["clean"]
        k_flipped.append(int(flipped.sum()))
        for s, v in suspicion_scores(scores).items():
            name = (loss_label(labels["loss"]) + (f" [{labels['params']}]" if labels["params"] else "")
                    + (f", {labels['noise']}" if several else ""))
            curves.setdefault(f"{name} / {SCORE_LABELS[s]}", []).append(precision_curve(v, flipped))
    shortest = min(len(c) for group in curves.values() for c in group)
    precision_panel(axes[0], {k: np.mean([c[:shortest] for c in v], axis=0) for k, v in curves.items()},
                     int(np.mean(k_flipped)))
    axes[0].set_title("Flipped labels among the top k (mean over the seeds)")
    drainage = next((r for r in runs if "p_drain" in np.load(r[1] / "scores.npz")), None)
    if drainage:
        scores = dict(np.load(drainage[1] / "scores.npz"))
        pd_histograms(axes[1], scores, scores["p_drain"])
        axes[1].set_title(f"p_d of the training samples ({drainage[1].parent.name}, seed "
                          f"{drainage[0]['seed']})")
    else:
        axes[1].axis("off")
    save_figure(fig, title, path)


def command_line(args) -> str:
    if args.runs:
        return reproducing_command("clean", args, ["runs", "ks"])
    return reproducing_command("clean", args, ["dataset", "losses", "noise", "seeds", "ks", "tuning", "grid",
                                               "set"])


def main(args) -> int:
    from ..experiment import check_plan

    if args.runs:
        runs = finished_runs(args.runs)
        # only the report goes there
        runs_dir = None if args.out else job_dir(args.runs_dir, f"clean-{args.dataset}")
    else:
        plan = plan_runs(args.dataset, args.losses, [parse_noise(n) for n in args.noise], args.seeds,
                         tuning=args.tuning, grid=args.grid, overrides=args.set)
        check_plan([run.cfg for run in plan])  # device, backend, dataset files: before the first folder
        runs_dir = job_dir(args.runs_dir, f"clean-{args.dataset}")
        runs = train_runs(plan, runs_dir)
    out = Path(args.out) if args.out else runs_dir / "cleaning"
    rows = result_rows(runs, args.ks)
    if not rows:
        print(f"no flipped labels in {[str(r) for _, r in runs]}: ranked CSVs written, nothing to score")
        return 0
    setting = ("finished runs" if args.runs else f"{', '.join(args.noise)} noise"
               + (", tuning split" if args.tuning else ""))
    title = f"{args.dataset}: finding flipped labels in the training set ({setting})"
    print(write_report(rows, runs, out, title, args.ks, select=args.tuning, command=command_line(args)))
    print(f"wrote {out}.md, {out}.csv, {out}_runs.csv, {out}.png; per run: cleaning_ranked.csv, "
          f"cleaning.json, cleaning.png in {sorted({str(r.parent) for _, r in runs})}")
    return 0
