"""The default job (`python -m train`): Drainage, its abstention ancestors Deep Gamblers and DAC, and
cross-entropy on scikit-learn's digits with 40% asymmetric label noise (the MNIST flip map 7->1, 2->7,
5<->6, 3->8), on the CPU; timing in docs/training.md.

Writes runs/default-<time>/ (a new folder, -2 for a second job in the same second): one run folder per
loss, results.md (the printed table), results.png (accuracy curves, p_d of clean vs flipped samples over
training, Drainage's final p_d histogram) and results_risk_coverage.png (the risk-coverage curves).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

LOSSES = ("drainage", "gamblers", "dac", "ce")
FLAGS = ("set",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=1, help="seeds the noise and every run (default 1)")
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
    """One row per loss and score family: the abstain output (AURC and risk by 1 - p_d, the noisy-label
    ranking by p_d, the share abstained), then the closed softmax (by the MSP; the ranking by 1 - p(given
    label))."""
    from ..report import loss_label, pct

    lines = [
        (
            "| loss / score | clean test acc., last epoch (%) | best epoch (%) | AURC (%) | "
            "selective risk at 90% coverage (%) | precision@k, noisy labels (%) | abstained (%) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for loss, s in summaries.items():
        families = [("p_d", "1-p_d", "precision_at_k_pd")] if "eval_aurc[1-p_d]" in s else []
        families.append(("softmax", "msp", "precision_at_k_self_conf"))
        for name, score, ranking in families:
            abstained = pct(s["eval_drained_frac"]) if name == "p_d" else ""
            lines.append(
                f"| {loss_label(loss)} / {name} | {pct(s['last_eval_acc'])} | {pct(s['best_eval_acc'])} | "
                f"{pct(s.get(f'eval_aurc[{score}]', nan))} | {pct(s.get(f'eval_risk@90[{score}]', nan))} | "
                f"{pct(s[ranking])} | {abstained} |"
            )
    return "\n".join(lines)


NOTES = (
    "Rows 'p_d' score by the abstain output: AURC and the selective risk (the error rate among the "
    "accepted test images, the 90% most confident) by the confidence 1 - p_d, precision@k by p_d, and "
    "abstained = the share of test images whose argmax over all K outputs is the abstain output. Rows "
    "'softmax' score every model the same way: AURC and risk by the maximum softmax probability over the "
    "C classes, precision@k by 1 - p(given label). AURC: the mean selective risk over every coverage "
    "(lower is better). precision@k: the share of flipped labels among the k training samples ranked most "
    "suspicious, k = the number of flipped labels. 'Best epoch' is the maximum over epochs of the test "
    "accuracy itself (optimistic); 'last epoch' is the honest number."
)


def main(args) -> int:
    from ..experiment import check_plan, run_experiment
    from ..grid import config_for, job_dir
    from ..report import loss_label, plot_default_job, plot_risk_coverage
    from ..selective import mean_risk_coverage

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
    noise = summaries["drainage"]["realised_noise_rate"]
    title = (
        f"digits, {args.noise_rate:.0%} asymmetric noise on classes 2, 3, 5, 6, 7 "
        f"({noise:.1%} of all training labels flipped), seed {args.seed}"
    )
    names = ", ".join(loss_label(loss) for loss in LOSSES)
    plot_default_job(runs, folder / "results.png", f"{names}: {title}")
    curves = mean_risk_coverage({loss_label(loss): [folder / loss] for loss in LOSSES})
    plot_risk_coverage({"test set": curves}, folder / "results_risk_coverage.png", f"{names}: {title}")
    table = results_table(summaries)
    elapsed = time.perf_counter() - start  # Python's start-up and imports before main() not included
    (folder / "results.md").write_text(
        f"# Default job\n\n{title}\n\n{table}\n\n{NOTES}\n\nWall time: {elapsed:.1f} s.\n"
    )
    print(f"\n{title}\n\n{table}\n\n{NOTES}\n")
    print(
        f"{elapsed:.1f} s. Outputs: {folder}/ (results.md, results.png, results_risk_coverage.png; a run "
        f"folder per loss, {', '.join(f'{loss}/' for loss in LOSSES)}, with config.json, metrics.csv, "
        f"summary.json, eval_scores.npz, ...)"
    )
    return 0
