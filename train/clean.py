"""`python -m train clean`: dataset cleaning. After training, rank every training sample by p_d (most
suspect first) and by self-confidence (1 - p(given label) over the C class outputs, the usual baseline);
where the clean labels are known, report how well each ranking finds the flipped labels.

    python -m train clean                                   # digits, Drainage and CE, 40% asym noise, seed 1
    python -m train clean --seeds 1 2 3 4 5 --out benchmarks/results/digits_cleaning
    python -m train clean --runs runs/<run> runs/<other>    # rank finished runs (their scores.npz)
    python -m train clean --tuning --seeds 101 102 --grid drainage:loss_params.alpha=0.03,1

Each run is `train run`'s (train/experiment.py: presets train/configs/<dataset>_<loss>.json); into its
folder go cleaning_ranked.csv (one row per training sample, ranked), cleaning.json and cleaning.png.
Metrics (drainage_fast.openset.cleaning_metrics): precision@k and recall@k at k = the number of flipped
labels (there precision = recall) and at --ks, and the AUROC of the score at separating flipped from
clean labels. The report: <out>.md, <out>.csv, <out>_runs.csv, <out>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from drainage_fast.openset import cleaning_metrics

from .cli import positive_int
from .plan import (
    config_for,
    grid_points,
    job_dir,
    parse_grid,
    parse_noise,
    point_overrides,
    point_tag,
    tuning_grid_set_flags,
)
from .run_dirs import UserError

SCORE_LABELS = {"p_d": "p_d", "self_confidence": "self-confidence"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="dataset of every run (default: digits)")
    p.add_argument("--losses", nargs="+", default=["drainage", "ce"], help="losses to train (default: drainage ce)")
    p.add_argument("--noise", default="asym:0.4", metavar="TYPE:RATE",
                   help="the noise setting with its rate, e.g. asym:0.4, sym:0.6, instance:0.4 (default asym:0.4)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1], help="training seeds (default: 1)")
    p.add_argument("--tuning", action="store_true", help="train on the noisy 80%% of the training set")
    p.add_argument("--grid", nargs="*", default=[], metavar="[LOSS:]KEY=V1,V2",
                   help="hyper-parameter axes, e.g. drainage:loss_params.alpha=0.03,1")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN_DIR",
                   help="finished runs to rank instead of training (any `train run` folder)")
    p.add_argument("--ks", nargs="+", type=positive_int, default=[10, 50, 100], help="fixed k for precision / recall")
    p.add_argument("--runs_dir", default=None,
                   help="run folders; a rerun on the same folder reuses its finished runs of the same config "
                   "(default: a new runs/clean-<dataset>-<time>)")
    p.add_argument("--out", default=None, help="output path prefix (default: <runs_dir>/cleaning)")


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
             "clean_label": int(scores["clean"][i]), "flipped": int(flipped[i]), "pred": int(scores["pred"][i]),
             **{s: float(v[i]) for s, v in suspicion.items()},
             **{f"rank_{s}": int(ranks[s][i]) for s in suspicion if s != first}}
            for r, i in enumerate(order)]


def precision_curve(score: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """(N,) precision@k for k = 1..N, in the stable ranking cleaning_metrics uses."""
    hits = flipped[np.argsort(-score, kind="stable")]
    return np.cumsum(hits) / np.arange(1, len(hits) + 1)


def rank_run(run_dir: str | Path, ks=(10, 50, 100)) -> dict:
    """Ranks a finished run's training set (run_dir/scores.npz); writes cleaning_ranked.csv, and with known
    flips cleaning.json and cleaning.png. Returns {"num_samples", "num_flipped", "scores": {score: metrics}}."""
    from .openset_run import write_rows

    run_dir = Path(run_dir)
    scores = dict(np.load(run_dir / "scores.npz"))
    suspicion = suspicion_scores(scores)
    write_rows(run_dir / "cleaning_ranked.csv", ranked_rows(scores, suspicion))
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
        plot_run(scores, suspicion, run_dir / "cleaning.png", f"{run_dir.name}: {k_flipped} of {n} labels flipped")
    (run_dir / "cleaning.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _pd_histograms(ax, scores: dict, p_d: np.ndarray) -> None:
    """p_d of flipped samples, of clean samples in classes that lost samples to flips, and of the rest:
    p_d tends to mark the ambiguous class more than the flipped sample, which this split shows."""
    flipped = scores["noisy"] != scores["clean"]
    affected = np.isin(scores["clean"], np.unique(scores["clean"][flipped]))
    bins = np.linspace(0, 1, 41)
    for mask, label, color in ((flipped, "flipped labels", "tab:red"),
                               (~flipped & affected, "clean, classes with flips", "tab:orange"),
                               (~flipped & ~affected, "clean, classes without flips", "tab:green")):
        if not mask.any():
            continue
        ax.hist(p_d[mask], bins, alpha=0.55, color=color, density=True, label=f"{label} (n={int(mask.sum())})")
    ax.set(xlabel="p_d of the training sample", ylabel="density", title="p_d: flipped vs clean labels")
    ax.legend(fontsize=8, loc="upper center")


def _precision_panel(ax, curves: dict[str, np.ndarray], k_flipped: int) -> None:
    for label, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), 100 * curve, lw=2, label=label)
    ax.axvline(k_flipped, color="grey", ls="--", lw=1, label=f"k = number flipped ({k_flipped})")
    ax.set(xlabel="k (samples inspected, most suspect first)", ylabel="precision@k (%)", ylim=(0, 102),
           xlim=(1, min(len(next(iter(curves.values()))), 3 * k_flipped)), title="Flipped labels among the top k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_run(scores: dict, suspicion: dict, path: Path, title: str) -> None:
    from .report import _pyplot

    plt = _pyplot()
    flipped = scores["noisy"] != scores["clean"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    _precision_panel(axes[0], {SCORE_LABELS[s]: precision_curve(v, flipped) for s, v in suspicion.items()},
                     int(flipped.sum()))
    if "p_d" in suspicion:
        _pd_histograms(axes[1], scores, suspicion["p_d"])
    else:
        axes[1].axis("off")
    _save_figure(fig, title, path)


def plan_runs(args) -> list[tuple[dict, object]]:
    """[(labels, config)] for every loss x grid point x seed, validated (a UserError for any mistake)."""
    kind, rate = parse_noise(args.noise)
    axes = parse_grid(args.grid)
    return [({"loss": loss, "params": point_tag(point), "seed": seed},
             config_for(args.dataset, loss, [f"noise_type={kind}", f"noise_rate={rate}", f"seed={seed}",
                                             "checkpoint=false", f"tuning={args.tuning}", *args.set,
                                             *point_overrides(point)]))
            for loss in args.losses for point in grid_points(loss, axes) for seed in args.seeds]


def train_runs(plan: list[tuple[dict, object]], runs_dir: Path) -> list[tuple[dict, Path]]:
    """Trains every planned run under runs_dir/<loss>[<params>]/s<seed>, reusing a finished run of the same
    config (experiment.reuse_or_claim); [(labels, run_dir)]."""
    from .experiment import reuse_or_claim, run_experiment

    done = []
    for labels, cfg in plan:
        folder = f"{labels['loss']}[{labels['params']}]" if labels["params"] else labels["loss"]
        run_dir, reused, notes = reuse_or_claim(runs_dir / folder, f"s{labels['seed']}", cfg)
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
        runs.append(({"loss": cfg["loss"], "params": point_tag(cfg["loss_params"]), "seed": cfg["seed"]}, path))
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
    from .report import aggregate, loss_label, pct, write_csv

    out.parent.mkdir(parents=True, exist_ok=True)
    fixed = [f"{kind}@{k}" for k in ks for kind in ("precision", "recall") if f"precision@{k}" in rows[0]]
    metrics = ["precision@k_flipped", *fixed, "AUROC"]
    agg = aggregate(rows, ["loss", "params", "score"], [*metrics, "num_flipped"])
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
        name = loss_label(a["loss"]) + (f" [{a['params']}]" if a["params"] else "") + f" / {SCORE_LABELS[a['score']]}"
        text.append(f"| {name} | " + " | ".join(pct(a[f"{m}_mean"], a[f"{m}_std"]) for m in metrics) + " |")
    text.append("")
    if select and any(a["params"] for a in agg):
        text += ["## Selected: highest mean AUROC of each loss's own score (p_d for Drainage)", ""]
        for loss in dict.fromkeys(a["loss"] for a in agg):
            own = "p_d" if any(a["score"] == "p_d" for a in agg if a["loss"] == loss) else "self_confidence"
            best = max((a for a in agg if a["loss"] == loss and a["score"] == own), key=lambda a: a["AUROC_mean"])
            text.append(f"- {loss_label(loss)}: `{best['params'] or 'preset'}` (AUROC {100 * best['AUROC_mean']:.2f})")
        text.append("")
    if command:
        text += ["## Reproduce", "", f"    {command}", ""]
    out.with_suffix(".md").write_text("\n".join(text))
    plot_report(rows, runs, out.with_suffix(".png"), title)
    return "\n".join(text)


def plot_report(rows: list[dict], runs: list[tuple[dict, Path]], path: Path, title: str) -> None:
    """Mean precision@k curve per model / score over the runs; p_d histograms of the first Drainage run."""
    from .report import _pyplot, loss_label

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    curves, k_flipped = {}, []
    for labels, run_dir in runs:
        scores = dict(np.load(run_dir / "scores.npz"))
        flipped = scores["noisy"] != scores["clean"]
        k_flipped.append(int(flipped.sum()))
        for s, v in suspicion_scores(scores).items():
            name = loss_label(labels["loss"]) + (f" [{labels['params']}]" if labels["params"] else "")
            curves.setdefault(f"{name} / {SCORE_LABELS[s]}", []).append(precision_curve(v, flipped))
    shortest = min(len(c) for group in curves.values() for c in group)
    _precision_panel(axes[0], {k: np.mean([c[:shortest] for c in v], axis=0) for k, v in curves.items()},
                     int(np.mean(k_flipped)))
    axes[0].set_title("Flipped labels among the top k (mean over the seeds)")
    drainage = next((r for r in runs if "p_drain" in np.load(r[1] / "scores.npz")), None)
    if drainage:
        scores = dict(np.load(drainage[1] / "scores.npz"))
        _pd_histograms(axes[1], scores, scores["p_drain"])
        axes[1].set_title(f"p_d of the training samples ({drainage[1].parent.name}, seed {drainage[0]['seed']})")
    else:
        axes[1].axis("off")
    _save_figure(fig, title, path)


def _save_figure(fig, title: str, path: Path) -> None:
    from .report import _pyplot

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def command_line(args) -> str:
    if args.runs:
        return "python -m train clean --runs " + " ".join(args.runs)
    parts = ["python -m train clean", f"--dataset {args.dataset}", "--losses " + " ".join(args.losses),
             f"--noise {args.noise}", "--seeds " + " ".join(map(str, args.seeds))]
    return " ".join(parts + tuning_grid_set_flags(args))


def main(args) -> int:
    from .experiment import check_plan

    if args.runs:
        runs = finished_runs(args.runs)
        # only the report goes there
        runs_dir = None if args.out else job_dir(args.runs_dir, f"clean-{args.dataset}")
    else:
        plan = plan_runs(args)
        check_plan([cfg for _, cfg in plan])  # device, backend, dataset files: before the first folder
        runs_dir = job_dir(args.runs_dir, f"clean-{args.dataset}")
        runs = train_runs(plan, runs_dir)
    out = Path(args.out) if args.out else runs_dir / "cleaning"
    rows = result_rows(runs, args.ks)
    if not rows:
        print(f"no flipped labels in {[str(r) for _, r in runs]}: ranked CSVs written, nothing to score")
        return 0
    setting = "finished runs" if args.runs else f"{args.noise} noise" + (", tuning split" if args.tuning else "")
    title = f"{args.dataset}: finding flipped labels in the training set ({setting})"
    print(write_report(rows, runs, out, title, args.ks, select=args.tuning, command=command_line(args)))
    print(f"wrote {out}.md, {out}.csv, {out}_runs.csv, {out}.png; per run: cleaning_ranked.csv, cleaning.json, "
          f"cleaning.png in {sorted({str(r.parent) for _, r in runs})}")
    return 0
