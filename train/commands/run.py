"""`python -m train run`: one training run from a config, with the Drainage / ANL authors' flags.

    python -m train run --config cifar10_drainage --noise_type asym --noise_rate 0.4 --seed 1
    python -m train run --config digits_drainage --set epochs=30 loss_params.alpha=0.5 --tuning
    python -m train run --resume runs/<name>                    # continue an interrupted run exactly
    python -m train run --resume runs/<name> --set epochs=400   # extend it (epochs, eval_freq only)

Each new run gets a folder of its own under --out_dir: --name names it (an existing folder is refused
unless --overwrite), otherwise <time>-<dataset>-<loss>-<noise>-s<seed>-<config hash>, with -2, -3, ...
for an equal run started in the same second. At the end it prints the selective-classification table
(AURC, E-AURC, the selective risk at 100/95/90/80/70% coverage, per confidence) and writes
risk_coverage.png into the run folder; `--set coverage=0.9` adds the abstention rule (predictions.csv).
"""

from __future__ import annotations

import argparse

from ..cli import positive_int
from ..config import preset_names
from ..run_dirs import UserError

FLAGS = ("tuning", "set")

# flags that set the config of a new run; a resumed run keeps its config (--eval_freq and --set epochs /
# eval_freq excepted, see experiment.RESUMABLE_KEYS)
NEW_RUN_FLAGS = (
    "config",
    "noise_type",
    "noise_rate",
    "seed",
    "tuning",
    "gpu",
    "data_root",
    "name",
    "out_dir",
    "tb",
    "overwrite",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="a preset of train/configs/ (" + ", ".join(preset_names()) + ") or a .json path, "
        "e.g. runs/<run>/config.json to repeat a run (default: the Config defaults)",
    )
    p.add_argument(
        "--noise_type",
        choices=["none", "sym", "asym", "instance", "human"],
        help="label noise applied to the training set (default: the config's)",
    )
    p.add_argument(
        "--noise_rate",
        type=float,
        metavar="RATE",
        help="share of training labels the noise flips, in [0, 1] (default: the config's)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seeds the noise, the initialisation, the batch order and augmentation (default: the config's)",
    )
    p.add_argument(
        "--eval_freq",
        type=int,
        metavar="N",
        help="evaluate every N epochs, and always after the first and the last (default: the config's)",
    )
    p.add_argument("--gpu", help="CUDA device id (the authors' flag); same as --set device=cuda:ID")
    p.add_argument("--data_root", help="where datasets live (default: data)")
    p.add_argument(
        "--name",
        help="run folder name under --out_dir; refused when that folder exists "
        "(default: <time>-<dataset>-<loss>-<noise>-s<seed>-<config hash>, always a new folder)",
    )
    p.add_argument("--out_dir", help="parent folder of run folders (default: runs)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the existing run folder --name names (its files are deleted first)",
    )
    p.add_argument("--tb", action="store_true", help="write TensorBoard event files (tb/ in the run folder)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint; "
        "only --eval_freq, --set epochs=N / eval_freq=N, --run_epochs and --quiet go with it",
    )
    p.add_argument(
        "--run_epochs", type=positive_int, metavar="N", help="stop after epoch N (continue with --resume)"
    )
    p.add_argument("--quiet", action="store_true", help="no console log or progress bar")


def overrides_from(args) -> list[str]:
    """The config overrides the flags ask for, as key=value strings (--set last, so it wins)."""
    flags = {
        "noise_type": args.noise_type,
        "noise_rate": args.noise_rate,
        "seed": args.seed,
        "eval_freq": args.eval_freq,
        "data_root": args.data_root,
        "name": args.name,
        "out_dir": args.out_dir,
    }
    items = [f"{k}={v}" for k, v in flags.items() if v is not None]
    items += ["tuning=true"] if args.tuning else []
    items += ["tb=true"] if args.tb else []
    items += [f"device=cuda:{args.gpu}"] if args.gpu is not None else []
    return items + list(args.set)


def main(args) -> int:
    from ..config import load_config
    from ..experiment import resume_experiment, run_experiment

    if args.resume:
        given = [f"--{flag}" for flag in NEW_RUN_FLAGS if getattr(args, flag) not in (None, False)]
        if given:
            raise UserError(
                f"--resume {args.resume} with {' '.join(given)}: a resumed run keeps its config; "
                "only --eval_freq, --set epochs=N / eval_freq=N, --run_epochs and --quiet apply"
            )
        overrides = ([f"eval_freq={args.eval_freq}"] if args.eval_freq is not None else []) + list(args.set)
        result = resume_experiment(args.resume, overrides, quiet=args.quiet, stop_after=args.run_epochs)
    else:
        cfg = load_config(args.config, overrides_from(args))
        if args.overwrite and not cfg.name:
            raise UserError(
                "--overwrite replaces the folder --name names; give --name (a default name is "
                "always a new folder)"
            )
        result = run_experiment(cfg, overwrite=args.overwrite, quiet=args.quiet, stop_after=args.run_epochs)
    s = result.summary
    if args.quiet:
        print(
            f"{result.run_dir}: best {s['eval_split']} acc {s['best_eval_acc']:.4f}, "
            f"last {s['last_eval_acc']:.4f}"
        )
    else:
        print(selective_report(result))
    return 0


def selective_report(result) -> str:
    """The run's selective-classification table, and its risk-coverage figure (risk_coverage.png in the
    run folder)."""
    import json

    from ..report import confidences_in, loss_label, plot_risk_coverage, selective_table
    from ..selective import mean_risk_coverage

    s, cfg = result.summary, json.loads((result.run_dir / "config.json").read_text())
    label = loss_label(cfg["loss"])
    split = s["eval_split"]
    figure = result.run_dir / "risk_coverage.png"
    plot_risk_coverage(
        {f"{split} set": mean_risk_coverage({label: [result.run_dir]})}, figure, result.run_dir.name
    )
    table = selective_table([(label, c, s) for c in confidences_in(s)])
    return (
        f"\nselective classification, {split} set, last epoch (%; AURC: mean selective risk over every "
        f"coverage, lower is better):\n\n{table}\n\nrisk-coverage curves: {figure}"
    )
