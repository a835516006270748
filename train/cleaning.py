"""Dataset cleaning: rank every training sample of a finished run by a suspicion score (higher = more
suspect): p_d for a model with an abstain output (Drainage, Deep Gamblers, DAC), and self-confidence
(1 - the closed-softmax probability of the given label, the usual baseline). Used by `train clean`.

    rank_run(run_dir, ks)       cleaning_ranked.csv, and where labels were flipped cleaning.json (metrics of
                                drainage_fast.openset.cleaning_metrics) and cleaning.png
    train_runs(plan, runs_dir)  trains (or reuses) the planned runs of train/grid.py plan_runs
    finished_runs(paths)        `train run` folders as they are
    result_rows(runs, ks)       one row per run and score
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from drainage_fast.openset import cleaning_metrics, precision_curve

from .grid import PlannedRun, distinct, point_tag, resolved_path
from .report import write_csv
from .report.cleaning import plot_cleaning
from .run_dirs import UserError

SCORE_LABELS = {"p_d": "p_d", "self_confidence": "self-confidence"}


def suspicion_scores(scores: dict) -> dict[str, np.ndarray]:
    """Higher = more suspect: p_d (models with an abstain output) and 1 - p(given label)."""
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
    return [
        {
            "rank": r + 1,
            "index": int(scores["index"][i]),
            "given_label": int(scores["noisy"][i]),
            "clean_label": int(scores["clean"][i]),
            "flipped": int(flipped[i]),
            "pred": int(scores["pred"][i]),
            **{s: float(v[i]) for s, v in suspicion.items()},
            **{f"rank_{s}": int(ranks[s][i]) for s in suspicion if s != first},
        }
        for r, i in enumerate(order)
    ]


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
        curves = {SCORE_LABELS[s]: precision_curve(v, flipped) for s, v in suspicion.items()}
        histogram = (scores, suspicion["p_d"]) if "p_d" in suspicion else None
        plot_cleaning(
            curves,
            k_flipped,
            histogram,
            run_dir / "cleaning.png",
            f"{run_dir.name}: {k_flipped} of {n} labels flipped",
        )
    (run_dir / "cleaning.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def train_runs(plan: list[PlannedRun], runs_dir: Path, continue_with: str = "") -> list[tuple[dict, Path]]:
    """Trains every planned run under runs_dir/<loss>[<params>]/<noise>/s<seed>, reusing a finished run of
    the same config and continuing a cut one (train/jobs.py); [(labels, run_dir)]. Ctrl-C:
    run_dirs.Interrupted, whose line ends with continue_with."""
    from .jobs import Job, plan_experiment, train_planned

    done = []
    with Job(continue_with, runs_dir) as job:
        planned = [plan_experiment(job, run, runs_dir) for run in plan]
        print(job.counts(), flush=True)
        for run, planned_run in zip(plan, planned):
            slot = job.claim(planned_run)
            if slot.state != "reused":
                train_planned(run.cfg, slot.run_dir, slot.state, continue_with)
                job.release(slot)
                print(f"trained {slot.run_dir}", flush=True)
            done.append((run.labels, slot.run_dir))
    return done


def finished_runs(paths: list[str]) -> list[tuple[dict, Path]]:
    """[(labels, run_dir)] for `train run` folders; runs of the same loss and loss parameters (seeds)
    are aggregated together. A folder without config.json and scores.npz is a UserError."""
    runs = []
    for path in map(Path, distinct("--runs", paths, resolved_path)):
        missing = [name for name in ("config.json", "scores.npz") if not (path / name).is_file()]
        if missing:
            raise UserError(f"--runs {path}: not a finished run folder (no {', '.join(missing)})")
        cfg = json.loads((path / "config.json").read_text())
        noise = f"{cfg['noise_type']}:{cfg['noise_rate']:g}"
        runs.append(
            (
                {
                    "loss": cfg["loss"],
                    "params": point_tag(cfg["loss_params"]),
                    "noise": noise,
                    "seed": cfg["seed"],
                },
                path,
            )
        )
    return runs


def result_rows(runs: list[tuple[dict, Path]], ks) -> list[dict]:
    rows = []
    for labels, run_dir in runs:
        result = rank_run(run_dir, ks)
        for score, m in result["scores"].items():
            rows.append(
                {**labels, "score": score, "num_flipped": result["num_flipped"], **m, "run_dir": str(run_dir)}
            )
    return rows


def mean_curves(runs: list[tuple[dict, Path]]) -> tuple[dict[str, np.ndarray], int]:
    """Mean precision@k curve per model / score over the runs (seeds), cut to the shortest, and the mean
    number of flipped labels: label "<loss>[ [<params>]][, <noise>] / <score>" -> (N,)."""
    from .report import loss_label

    several = len({labels["noise"] for labels, _ in runs}) > 1  # noise settings: named only then
    curves, k_flipped = {}, []
    for labels, run_dir in runs:
        scores = dict(np.load(run_dir / "scores.npz"))
        flipped = scores["noisy"] != scores["clean"]
        k_flipped.append(int(flipped.sum()))
        for s, v in suspicion_scores(scores).items():
            name = (
                loss_label(labels["loss"])
                + (f" [{labels['params']}]" if labels["params"] else "")
                + (f", {labels['noise']}" if several else "")
            )
            curves.setdefault(f"{name} / {SCORE_LABELS[s]}", []).append(precision_curve(v, flipped))
    shortest = min(len(c) for group in curves.values() for c in group)
    return {k: np.mean([c[:shortest] for c in v], axis=0) for k, v in curves.items()}, int(np.mean(k_flipped))
