"""`python -m train sweep`: losses x noise settings x seeds (x a hyper-parameter grid) -> mean +- std.

    python -m train sweep --dataset digits --losses drainage ce gce sce nce_rce anl_ce \\
        --noise asym:0.2 asym:0.4 instance:0.4 --seeds 5 --out benchmarks/results/digits_robust_losses

Each loss starts from the preset <dataset>_<loss>.json when there is one, else <dataset>.json with the
loss swapped in. --grid adds hyper-parameter axes, for all losses (lr=0.03,0.1) or one (drainage:
loss_params.alpha=0.5,1,2); with --tuning the runs evaluate on the clean validation split, never the test
set, and the table marks each loss's best setting by mean last-epoch validation accuracy.
Writes <out>.md, <out>.csv (aggregated), <out>_runs.csv (one row per run) and <out>.png; run folders
go under --runs_dir, and a run whose summary.json exists is reused (rerunning a sweep resumes it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np

from .config import CONFIG_DIR

METRICS = ["best_eval_acc", "last_eval_acc", "eval_drained_frac", "precision_at_k_pd",
           "precision_at_k_self_conf", "memorized_frac", "pd_clean", "pd_flipped", "realised_noise_rate",
           "train_time_s"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits")
    p.add_argument("--losses", nargs="+", default=["drainage", "ce"])
    p.add_argument("--noise", nargs="+", default=["asym:0.4"], metavar="TYPE:RATE",
                   help="noise settings, e.g. asym:0.4 sym:0.6 instance:0.4 human:0")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting: seed_start, seed_start + 1, ...")
    p.add_argument("--seed_start", type=int, default=1)
    p.add_argument("--tuning", action="store_true", help="evaluate on the clean 20%% validation split")
    p.add_argument("--grid", nargs="*", default=[], metavar="[LOSS:]KEY=V1,V2",
                   help="hyper-parameter axes, e.g. lr=0.03,0.1 drainage:loss_params.alpha=0.5,1,2")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--out", default=None, help="output path prefix (default: <runs_dir>/sweep)")
    p.add_argument("--runs_dir", default=None, help="run folders (default: runs/sweep-<dataset>-<time>)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (one CPU thread each)")
    p.add_argument("--title", default=None)


def parse_noise(item: str) -> tuple[str, float]:
    kind, _, rate = item.partition(":")
    return kind, float(rate or 0)


def parse_grid(items: list[str]) -> list[tuple[str | None, str, list]]:
    """["drainage:loss_params.alpha=0.5,1", "lr=0.1"] -> [("drainage", "loss_params.alpha", [0.5, 1]), ...]"""
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        loss, _, key = key.rpartition(":") if ":" in key else (None, None, key)
        axes.append((loss or None, key, [json.loads(v) if v[:1] in "-.0123456789tfn[" else v
                                         for v in values.split(",")]))
    return axes


def grid_points(loss: str, axes) -> list[dict]:
    """Every combination of the axes that apply to `loss` (one empty point when none do)."""
    mine = [(key, values) for owner, key, values in axes if owner in (None, loss)]
    return [dict(zip([k for k, _ in mine], combo)) for combo in itertools.product(*[v for _, v in mine])]


def base_config_name(dataset: str, loss: str) -> str | None:
    for name in (f"{dataset}_{loss}", dataset):
        if (CONFIG_DIR / f"{name}.json").exists():
            return name
    return None


def config_for(dataset: str, loss: str, overrides: list[str]):
    """<dataset>_<loss>.json, else <dataset>.json with `loss` and no loss parameters, then overrides."""
    from .config import load_config

    name = base_config_name(dataset, loss)
    reset = [] if name == f"{dataset}_{loss}" else [f"dataset={dataset}", f"loss={loss}", "loss_params={}"]
    return load_config(name, reset + list(overrides))


def _run_one(job: tuple) -> dict:
    """Worker for --jobs > 1: one run in a fresh process, one CPU thread (tiny models run faster so)."""
    import torch

    from .experiment import run_experiment

    dataset, loss, overrides, run_dir, threads = job
    if threads:
        torch.set_num_threads(threads)
    return run_experiment(config_for(dataset, loss, overrides), run_dir, quiet=True, progress=False).summary


def point_tag(point: dict) -> str:
    return ",".join(f"{k.replace('loss_params.', '')}={v}" for k, v in point.items())


def run_sweep(dataset: str, losses: list[str], noises: list[tuple[str, float]], seeds: list[int], *,
              tuning: bool = False, grid: list[str] = (), overrides: list[str] = (), runs_dir: Path,
              jobs: int = 1) -> list[dict]:
    """Runs (or reuses) every run, `jobs` at a time; returns one row per run: loss, params, noise, seed
    and METRICS, in plan order."""
    axes = parse_grid(list(grid))
    plan = [(loss, point, noise, seed) for loss in losses for point in grid_points(loss, axes)
            for noise in noises for seed in seeds]
    jobs_to_run, summaries = {}, {}
    for i, (loss, point, (kind, rate), seed) in enumerate(plan):
        folder = f"{loss}[{point_tag(point)}]" if point else loss
        run_dir = runs_dir / folder / f"{kind}{rate:g}" / f"s{seed}"
        if (run_dir / "summary.json").exists():
            summaries[i] = json.loads((run_dir / "summary.json").read_text())
            continue
        overrides_i = [f"noise_type={kind}", f"noise_rate={rate}", f"seed={seed}",
                       f"tuning={str(tuning).lower()}", "checkpoint=false", *overrides,
                       *[f"{k}={json.dumps(v)}" for k, v in point.items()]]
        jobs_to_run[i] = (dataset, loss, overrides_i, run_dir, 1 if jobs > 1 else 0)
    print(f"{len(plan)} runs: {len(summaries)} reused, {len(jobs_to_run)} to run ({jobs} at a time)",
          flush=True)
    start = time.perf_counter()
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, job): i for i, job in jobs_to_run.items()}
            for n, future in enumerate(futures, 1):
                summaries[futures[future]] = future.result()
                _progress(n, len(jobs_to_run), plan[futures[future]], summaries[futures[future]], start)
    else:
        for n, (i, job) in enumerate(jobs_to_run.items(), 1):
            summaries[i] = _run_one(job)
            _progress(n, len(jobs_to_run), plan[i], summaries[i], start)
    return [{"loss": loss, "params": point_tag(point), "noise": f"{kind}:{rate:g}", "seed": seed,
             "eval_split": summaries[i]["eval_split"], **{m: summaries[i].get(m) for m in METRICS}}
            for i, (loss, point, (kind, rate), seed) in enumerate(plan)]


def _progress(n: int, total: int, planned: tuple, summary: dict, start: float) -> None:
    loss, point, (kind, rate), seed = planned
    print(f"[{n}/{total}] {loss:>9} {point_tag(point):<30} {kind}:{rate:g} seed {seed}: best "
          f"{summary['best_eval_acc']:.4f} last {summary['last_eval_acc']:.4f} "
          f"({time.perf_counter() - start:.0f}s)",
          flush=True)


def write_report(rows: list[dict], out: Path, title: str, command: str = "") -> str:
    from .report import aggregate, loss_label, markdown_grid, plot_grid, plot_sweep, write_csv

    out.parent.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows, ["loss", "params", "noise", "eval_split"], METRICS)
    write_csv(out.with_name(out.name + "_runs.csv"), rows)
    write_csv(out.with_suffix(".csv"), agg)
    for a in agg:
        a["setting"] = loss_label(a["loss"]) + (f" [{a['params']}]" if a["params"] else "")
    split = rows[0]["eval_split"]
    seeds = sorted({r["seed"] for r in rows})
    text = [f"# {title}", "", (f"Clean {split} accuracy (%), mean ± std over seeds {seeds}; the best mean "
            f"of each column in bold. 'Last' = after the final epoch; 'best' = the maximum over evaluated "
            f"epochs "
            f"(selected on the {split} set itself, as the papers report it, so optimistic)."), "",
            f"## Last epoch ({split})", "", markdown_grid(agg, "setting", "noise", "last_eval_acc"), "",
            f"## Best epoch ({split})", "", markdown_grid(agg, "setting", "noise", "best_eval_acc"), ""]
    drain = [a for a in agg if a["loss"] == "drainage"]
    if drain:
        text += ["## Drainage diagnostics (last epoch)", "",
                 ("Drained = share of the evaluation images whose argmax over all K outputs is the drainage "
                  "node. Precision@k = share of flipped labels among the k training samples with the highest "
                  "score, k = number of flipped labels; p_d scores Drainage, 1 - p(given label) scores the "
                  "same model (self-confidence, the usual baseline)."), "",
                 ("| setting | noise | drained (%) | precision@k p_d (%) | precision@k self-conf. (%) | "
                 "mean p_d clean | mean p_d flipped |"), "|---|---|---:|---:|---:|---:|---:|"]
        text += [f"| {a['setting']} | {a['noise']} | {_cell(a, 'eval_drained_frac')} | "
                 f"{_cell(a, 'precision_at_k_pd')} | {_cell(a, 'precision_at_k_self_conf')} | "
                 f"{a['pd_clean_mean']:.3f} | {a['pd_flipped_mean']:.3f} |" for a in drain]
        text.append("")
    selected = select_per_loss(agg) if any(a["params"] for a in agg) else {}
    if selected:
        text += [f"## Selected: highest mean last-epoch {split} accuracy over all noise settings" + (
            "" if split == "val" else " (on the test set: for reading only, never for choosing)"), ""]
        text += [f"- {loss_label(loss)}: `{params or 'preset'}` (mean {100 * score:.2f}%)"
                 for loss, (params, score) in selected.items()]
        text.append("")
    if command:
        text += ["## Reproduce", "", f"    {command}", ""]
    (out.with_suffix(".md")).write_text("\n".join(text))
    if selected:
        plot_grid(agg, out.with_suffix(".png"), title, {loss: p for loss, (p, _) in selected.items()})
    else:
        plot_sweep(agg, out.with_suffix(".png"), title)
    return "\n".join(text)


def select_per_loss(agg: list[dict]) -> dict[str, tuple[str, float]]:
    """loss -> (grid point, score): the point with the highest last-epoch accuracy averaged over the noise
    settings (on the validation split when the sweep ran with --tuning)."""
    chosen = {}
    for loss in dict.fromkeys(a["loss"] for a in agg):
        scores = {}
        for a in agg:
            if a["loss"] == loss:
                scores.setdefault(a["params"], []).append(a["last_eval_acc_mean"])
        best = max(scores, key=lambda p: np.mean(scores[p]))
        chosen[loss] = (best, float(np.mean(scores[best])))
    return chosen


def _cell(agg: dict, metric: str) -> str:
    mean, std = agg[f"{metric}_mean"], agg[f"{metric}_std"]
    return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def tuning_grid_set_flags(args) -> list[str]:
    """The --tuning / --grid / --set flags of a command line that reproduces `args` (sweep, osr, clean)."""
    return ((["--tuning"] if args.tuning else []) + (["--grid " + " ".join(args.grid)] if args.grid else [])
            + (["--set " + " ".join(args.set)] if args.set else []))


def command_line(args) -> str:
    """The sweep as a command (for the report: how to reproduce it)."""
    parts = ["python -m train sweep", f"--dataset {args.dataset}", "--losses " + " ".join(args.losses),
             "--noise " + " ".join(args.noise), f"--seeds {args.seeds}", f"--seed_start {args.seed_start}"]
    return " ".join(parts + tuning_grid_set_flags(args))


def main(args) -> int:
    runs_dir = Path(args.runs_dir or f"runs/sweep-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out) if args.out else runs_dir / "sweep"
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    rows = run_sweep(args.dataset, args.losses, [parse_noise(n) for n in args.noise], seeds,
                     tuning=args.tuning, grid=args.grid, overrides=args.set, runs_dir=runs_dir,
                     jobs=args.jobs)
    title = args.title or (f"{args.dataset}: robust losses under label noise "
                           f"({'validation split, tuning' if args.tuning else 'test set'})")
    print(write_report(rows, out, title, command_line(args)))
    print(f"wrote {out}.md, {out}.csv, {out}_runs.csv, {out}.png; runs in {runs_dir}")
    return 0
