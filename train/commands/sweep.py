"""`python -m train sweep`: losses x noise settings x seeds (x a hyper-parameter grid) -> mean +- std.

    python -m train sweep --dataset digits --losses drainage ce gce sce nce_rce anl_ce \\
        --noise asym:0.2 asym:0.4 instance:0.4 --seeds 1-5 --out benchmarks/results/digits_robust_losses

Each loss starts from the preset <dataset>_<loss>.json when there is one, else <dataset>.json with the
loss swapped in. --grid adds hyper-parameter axes, for all losses (lr=0.03,0.1) or one (drainage:
loss_params.alpha=0.5,1,2); with --tuning the runs evaluate on the clean validation split, never the test
set, and the table marks each loss's best setting by mean last-epoch validation accuracy.
Writes <out>.md, <out>.csv (aggregated), <out>_runs.csv (one row per run), <out>.png (accuracy) and
<out>_risk_coverage.png (the mean risk-coverage curves). The report compares the losses in one table
(accuracy last and best, AURC and the selective risk at 90% coverage, precision@k of the noisy-label
ranking; with --openset_splits the open-set AUROC too, from runs on clean labels, 6 known / 4 unknown
classes), then gives the selective risks at 100/95/90/80/70% coverage per noise setting. Run folders
go under --runs_dir (default: a new runs/sweep-<dataset>-<time>), one per run at
<loss>[<grid point>]/<noise>/s<seed> (open-set runs: openset/<loss>/<split>/s<seed>). Ctrl-C stops the
sweep with one line (runs finished, runs cut, the command that continues it); that command, the same sweep
on the same --runs_dir, reuses every finished run whose config.json equals the requested config and
continues a cut run in place from its last.pt (bit for bit as if never cut, on the CPU); a folder of another
config, or one a parallel sweep is training, is left alone and the run goes to a fresh s<seed>-2, -3, ...
folder beside it (train/jobs.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..arguments import several
from ..cli import SHARED_FLAGS, SeedList, positive_int, seed_items
from ..grid import (
    PlannedRun,
    best_points,
    job_dir,
    parse_noises,
    plan_runs,
    point_tag,
    reproducing_command,
)
from ..losses import LOSS_NAMES
from ..report import CONFIDENCE_LABELS, SELECTIVE_COLUMNS
from ..run_dirs import UserError

FLAGS = SHARED_FLAGS

METRICS = [
    "best_eval_acc",
    "last_eval_acc",
    "eval_drained_frac",
    *(f"{stem}[{confidence}]" for confidence in CONFIDENCE_LABELS for stem, _ in SELECTIVE_COLUMNS),
    "precision_at_k_pd",
    "precision_at_k_self_conf",
    "memorized_frac",
    "pd_clean",
    "pd_flipped",
    "realised_noise_rate",
    "train_time_s",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="dataset of every run (default: digits)")
    several(
        p,
        "--losses",
        default=["drainage", "ce"],
        metavar="LOSS",
        help=f"losses to compare: {LOSS_NAMES} (default: drainage ce)",
    )
    p.add_argument(
        "--jobs", type=positive_int, default=1, help="runs in parallel processes (one CPU thread each)"
    )
    several(
        p,
        "--openset_splits",
        type=seed_items,
        action=SeedList,
        default=None,
        metavar="SEED",
        help="also train every loss on the known classes of these seeded open-set splits (clean labels, "
        "the loss's preset, the first of --seeds) and report its open-set AUROC: a list or a range, e.g. "
        "0-4",
    )
    p.add_argument(
        "--openset_known",
        type=positive_int,
        default=6,
        help="known classes of each --openset_splits split (default 6)",
    )
    p.add_argument("--title", default=None, help="report title (default: dataset and evaluation split)")
    p.set_defaults(seeds=[1, 2, 3])
    # gone: --seeds was a count from --seed_start; the commands recorded in benchmarks/results/ still say so
    p.add_argument("--seed_start", type=int, default=None, help=argparse.SUPPRESS)


def run_sweep(plan: list[PlannedRun], runs_dir: Path, jobs: int = 1, continue_with: str = "") -> list[dict]:
    """Runs, reuses or continues (train/jobs.py) every planned run, `jobs` at a time (in worker processes
    when more than 1); returns one row per run: loss, params, noise, seed and METRICS, in plan order.
    Ctrl-C: run_dirs.Interrupted, whose line ends with continue_with."""
    from ..jobs import Job, Workers, plan_experiment, train_planned

    summaries, start, trained = {}, time.perf_counter(), []
    with Job(continue_with, runs_dir) as job:
        planned = [plan_experiment(job, run, runs_dir) for run in plan]
        print(f"{job.counts()} ({jobs} at a time)", flush=True)
        to_run = sum(not (p.preview and p.preview.state == "reused") for p in planned)

        def ended(i: int, summary: dict) -> None:
            summaries[i] = summary
            job.release(planned[i].slot)
            trained.append(i)
            _progress(len(trained), to_run, plan[i], summary, start)

        with Workers(jobs if jobs > 1 else 0) as workers:
            for i, run in enumerate(plan):
                if jobs > 1 and not workers.idle:
                    ended(*workers.next_result())
                slot = job.claim(planned[i])
                args = (run.cfg, slot.run_dir, slot.state, continue_with)
                if slot.state == "reused":
                    summaries[i] = train_planned(*args)  # read back
                elif jobs > 1:
                    workers.submit(i, *args)
                else:
                    ended(i, train_planned(*args))
            while workers.busy:
                ended(*workers.next_result())
    return [
        {
            "loss": run.loss,
            "params": point_tag(run.point),
            "noise": f"{run.noise[0]}:{run.noise[1]:g}",
            "seed": run.seed,
            "eval_split": summaries[i]["eval_split"],
            **{m: summaries[i].get(m) for m in METRICS},
            "run_dir": str(planned[i].slot.run_dir),
        }
        for i, run in enumerate(plan)
    ]


def _progress(n: int, total: int, run: PlannedRun, summary: dict, start: float) -> None:
    kind, rate = run.noise
    print(
        f"[{n}/{total}] {run.loss:>9} {point_tag(run.point):<30} {kind}:{rate:g} seed {run.seed}: best "
        f"{summary['best_eval_acc']:.4f} last {summary['last_eval_acc']:.4f} "
        f"({time.perf_counter() - start:.0f}s)",
        flush=True,
    )


def write_report(
    rows: list[dict], out: Path, title: str, command: str = "", openset: dict | None = None
) -> str:
    """The report (module docstring); openset: {loss: aggregated open-set row of its own score}."""
    from ..report import (
        aggregate,
        loss_label,
        markdown_grid,
        plot_grid,
        plot_risk_coverage,
        plot_sweep,
        write_csv,
    )
    from ..report.abstention import comparison_table, diagnostics_section, selective_sections

    out.parent.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows, ["loss", "params", "noise", "eval_split"], METRICS)
    write_csv(out.with_name(out.name + "_runs.csv"), rows)
    write_csv(out.with_suffix(".csv"), agg)
    for a in agg:
        a["setting"] = loss_label(a["loss"]) + (f" [{a['params']}]" if a["params"] else "")
    split = rows[0]["eval_split"]
    seeds = sorted({r["seed"] for r in rows})
    over = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"one run per setting (seed {seeds[0]})"
    text = [
        f"# {title}",
        "",
        (
            f"Clean {split} accuracy (%), {over}; the best mean "
            f"of each column in bold. 'Last' = after the final epoch; 'best' = the maximum over evaluated "
            f"epochs "
            f"(selected on the {split} set itself, as the papers report it, so optimistic)."
        ),
        "",
        "## Comparison",
        "",
        (
            "In %, " + over + ". AURC and the selective risk at 90% coverage (lower is better) by the "
            "model's own confidence (1 - p_d with an abstain output, else the MSP) and by the MSP; "
            "precision@k: flipped labels among the k most suspect training samples, k = their number, "
            "ranked by p_d or by self-confidence (1 - p(given label))"
            + (
                "; open-set AUROC: the same preset trained on clean labels of the known classes, "
                "scored by p_d (abstaining losses) or the MSP, mean ± std over the splits"
                if openset is not None
                else ""
            )
            + "."
        ),
        "",
        comparison_table(agg, openset),
        "",
        f"## Last epoch ({split})",
        "",
        markdown_grid(agg, "setting", "noise", "last_eval_acc"),
        "",
        f"## Best epoch ({split})",
        "",
        markdown_grid(agg, "setting", "noise", "best_eval_acc"),
        "",
        *selective_sections(agg, split),
        *diagnostics_section(agg),
    ]
    selected = best_points(agg, "loss", "last_eval_acc_mean") if any(a["params"] for a in agg) else {}
    if selected:
        text += [
            f"## Selected: highest mean last-epoch {split} accuracy over all noise settings"
            + ("" if split == "val" else " (on the test set: for reading only, never for choosing)"),
            "",
        ]
        text += [
            f"- {loss_label(loss)}: `{params or 'preset'}` (mean {100 * score:.2f}%)"
            for loss, (params, score) in selected.items()
        ]
        text.append("")
    if command:
        text += ["## Reproduce", "", f"    {command}", ""]
    (out.with_suffix(".md")).write_text("\n".join(text))
    if selected:
        plot_grid(agg, out.with_suffix(".png"), title, {loss: p for loss, (p, _) in selected.items()})
    else:
        plot_sweep(agg, out.with_suffix(".png"), title)
    if all(r.get("run_dir") for r in rows):  # the runs' folders hold their eval_scores.npz
        plot_risk_coverage(
            risk_coverage_panels(rows, split), out.with_name(out.name + "_risk_coverage.png"), title
        )
    return "\n".join(text)


def risk_coverage_panels(rows: list[dict], split: str) -> dict[str, dict]:
    """One panel per noise setting: each setting's risk-coverage curves, the mean over its seeds' runs."""
    from ..report import counted, loss_label
    from ..selective import mean_risk_coverage

    panels = {}
    seeds = len({r["seed"] for r in rows})
    for noise in dict.fromkeys(r["noise"] for r in rows):
        groups: dict[str, list[Path]] = {}
        for r in rows:
            if r["noise"] == noise:
                label = loss_label(r["loss"]) + (f" [{r['params']}]" if r["params"] else "")
                groups.setdefault(label, []).append(Path(r["run_dir"]))
        panels[f"{noise}, {split} set, mean over {counted(seeds, 'seed')}"] = mean_risk_coverage(groups)
    return panels


def command_line(args, continue_in: Path | None = None) -> str:
    """The sweep as a command (for the report: how to reproduce it; with continue_in, its runs_dir: the
    command that continues it)."""
    flags = ["dataset", "losses", "noise", "seeds", "tuning", "grid", "set", "openset_splits"]
    if args.openset_splits:
        flags.append("openset_known")
    return reproducing_command("sweep", args, flags, continue_in=continue_in)


def main(args) -> int:
    from ..experiment import check_plan

    if args.seed_start is not None:
        first = args.seed_start
        raise UserError(
            f"--seed_start {first}: gone; --seeds lists the seeds themselves, e.g. --seeds "
            f"{first}-{first + 4} for five seeds from {first}"
        )
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
    openset_plan = plan_openset(args) if args.openset_splits else None
    runs_dir = job_dir(args.runs_dir, f"sweep-{args.dataset}")
    out = Path(args.out) if args.out else runs_dir / "sweep"
    continue_with = command_line(args, continue_in=runs_dir)
    rows = run_sweep(plan, runs_dir, jobs=args.jobs, continue_with=continue_with)
    openset = run_openset(openset_plan, runs_dir, continue_with) if openset_plan else None
    title = args.title or (
        f"{args.dataset}: robust losses under label noise "
        f"({'validation split, tuning' if args.tuning else 'test set'})"
    )
    print(write_report(rows, out, title, command_line(args), openset))
    print(
        f"wrote {out}.md, {out}.csv, {out}_runs.csv, {out}.png, {out}_risk_coverage.png; runs in {runs_dir}"
    )
    return 0


def plan_openset(args):
    """The open-set runs of --openset_splits: every loss (its preset, clean labels) on each seeded split,
    trained with the first of --seeds; checked whole (train/openset/runs.py plan_open_set)."""
    from ..openset.runs import plan_open_set
    from ..openset.splits import DATASET_CLASSES, seeded_splits

    if args.dataset not in DATASET_CLASSES:
        raise UserError(
            f"--openset_splits with --dataset {args.dataset}: open-set splits exist for "
            f"{sorted(DATASET_CLASSES)}"
        )
    splits, _ = seeded_splits(args.dataset, args.openset_known, args.openset_splits)
    overrides = [*(["tuning=true"] if args.tuning else []), *args.set]
    return plan_open_set(
        args.dataset,
        args.losses,
        splits,
        args.seeds[:1],
        grid=args.grid,
        overrides=overrides,
        preset_prefix=None,
    )


def run_openset(plan, runs_dir: Path, continue_with: str) -> dict[str, dict]:
    """Runs (or reuses) the open-set plan under runs_dir/openset; {loss: aggregated row (AUROC, OSCR, ...
    mean and std over the splits) of its own score}, for settings without a grid point."""
    from ..openset.runs import aggregate_scores, run_plan, score_rows

    runs = run_plan(plan, runs_dir / "openset", continue_with=continue_with)
    agg = aggregate_scores(score_rows(runs))
    return {a["method"]: a for a in agg if a["primary"] and not a["params"]}
