"""The default job (`python -m train`): Drainage vs cross-entropy on scikit-learn's digits with 40%
asymmetric label noise (the MNIST flip map 7->1, 2->7, 5<->6, 3->8), on the CPU in about 12 s (measured
10.4-12.1 s wall on 2 cores, Python start-up included).

Writes runs/default-<time>/ (a new folder, -2 for a second job in the same second): drainage/ and ce/ run
folders, results.md (the printed table) and results.png (accuracy curves, p_d of clean vs flipped samples
over training, the final p_d histogram).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

LOSSES = ("drainage", "ce")
FLAGS = ("set",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=1, help="seeds the noise and both runs (default 1)")
    p.add_argument(
        "--noise_rate",
        type=float,
        default=0.4,
        metavar="RATE",
        help="share of the labels of classes 2, 3, 5, 6, 7 flipped (default 0.4)",
    )
    p.add_argument("--out_dir", default="runs", help="parent of the job folder (default: runs)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--quiet", action="store_true", help="print only the table")


def results_table(summaries: dict[str, dict]) -> str:
    from ..report import loss_label, pct

    lines = [
        (
            "| loss | clean test acc, last epoch (%) | best epoch (%) | drained test images (%) | "
            "flipped labels memorised (%) | precision@k, p_d (%) | precision@k, self-confidence (%) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for loss, s in summaries.items():
        lines.append(
            f"| {loss_label(loss)} | {pct(s['last_eval_acc'])} | {pct(s['best_eval_acc'])} | "
            f"{pct(s.get('eval_drained_frac', float('nan')))} | {pct(s['memorized_frac'])} | "
            f"{pct(s.get('precision_at_k_pd', float('nan')))} | {pct(s['precision_at_k_self_conf'])} |"
        )
    return "\n".join(lines)


def main(args) -> int:
    from ..experiment import check_plan, run_experiment
    from ..grid import config_for, job_dir
    from ..report import plot_default_job

    start = time.perf_counter()
    configs = {
        loss: config_for(
            "digits",
            loss,
            [
                "noise_type=asym",
                f"noise_rate={args.noise_rate}",
                f"seed={args.seed}",
                f"device={args.device}",
                *args.set,
            ],
        )
        for loss in LOSSES
    }
    check_plan(list(configs.values()))
    folder = job_dir(None, "default", parent=args.out_dir)
    summaries, runs = {}, {}
    try:
        for loss, cfg in configs.items():
            result = run_experiment(cfg, folder / loss, quiet=args.quiet)
            summaries[loss] = result.summary
            runs[loss] = {"history": result.history, "scores": dict(np.load(result.run_dir / "scores.npz"))}
    except KeyboardInterrupt:  # a run cut before its first checkpoint leaves no folder: nor does the job
        if not any(folder.iterdir()):
            folder.rmdir()
        raise
    elapsed = time.perf_counter() - start
    noise = summaries["drainage"]["realised_noise_rate"]
    title = (
        f"digits, {args.noise_rate:.0%} asymmetric noise on classes 2, 3, 5, 6, 7 "
        f"({noise:.1%} of all training labels flipped), seed {args.seed}"
    )
    table = results_table(summaries)
    notes = (
        "precision@k: share of flipped labels among the k training samples ranked most suspicious, "
        "k = number of flipped labels; p_d ranks by the drainage probability (Drainage only), "
        "self-confidence by 1 - p(given label) over the C class outputs. 'Best epoch' is the maximum "
        "over epochs of the test accuracy itself (optimistic); 'last epoch' is the honest number."
    )
    (folder / "results.md").write_text(
        f"# Default job\n\n{title}\n\n{table}\n\n{notes}\n\nWall time: {elapsed:.1f} s.\n"
    )
    plot_default_job(runs, folder / "results.png", f"Drainage vs cross-entropy: {title}")
    print(f"\n{title}\n\n{table}\n\n{notes}\n")
    print(
        f"{elapsed:.1f} s. Outputs: {folder}/ (results.md, results.png, drainage/ and ce/ run folders "
        f"with config.json, env.json, noise.json, metrics.jsonl, summary.json)"
    )
    return 0
