"""`python -m train run`: one training run from a config, with the Drainage / ANL authors' flags.

    python -m train run --config cifar10_drainage --noise_type asym --noise_rate 0.4 --seed 1
    python -m train run --config digits_drainage --set epochs=30 loss_params.alpha=0.5 --tuning
    python -m train run --resume runs/<name>          # continue an interrupted run exactly
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="preset name in train/configs/ or a .json path (default: the Config defaults)")
    p.add_argument("--noise_type", choices=["none", "sym", "asym", "instance", "human"])
    p.add_argument("--noise_rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval_freq", type=int)
    p.add_argument("--tuning", action="store_true",
                   help="train on 80%% of the training set, evaluate on the other 20%% with clean labels "
                   "(for choosing hyper-parameters; the test set is not touched)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. epochs=10 lr=0.05 loss_params.alpha=0.5")
    p.add_argument("--gpu", help="CUDA device id (the authors' flag); same as --set device=cuda:ID")
    p.add_argument("--data_root", help="where datasets live (default: data)")
    p.add_argument("--name", help="run folder name under --out_dir")
    p.add_argument("--out_dir", help="parent folder of run folders (default: runs)")
    p.add_argument("--tb", action="store_true", help="write TensorBoard event files")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--run_epochs", type=int, metavar="N", help="stop after epoch N (continue with --resume)")
    p.add_argument("--quiet", action="store_true", help="no console log or progress bar")


def overrides_from(args) -> list[str]:
    """The config overrides the flags ask for, as key=value strings (--set last, so it wins)."""
    flags = {"noise_type": args.noise_type, "noise_rate": args.noise_rate, "seed": args.seed,
             "eval_freq": args.eval_freq, "data_root": args.data_root, "name": args.name,
             "out_dir": args.out_dir}
    items = [f"{k}={v}" for k, v in flags.items() if v is not None]
    items += ["tuning=true"] if args.tuning else []
    items += ["tb=true"] if args.tb else []
    items += [f"device=cuda:{args.gpu}"] if args.gpu is not None else []
    return items + list(args.set)


def main(args) -> int:
    from .config import load_config
    from .experiment import resume_experiment, run_experiment

    if args.resume:
        result = resume_experiment(args.resume, quiet=args.quiet, stop_after=args.run_epochs)
    else:
        cfg = load_config(args.config, overrides_from(args))
        result = run_experiment(cfg, quiet=args.quiet, stop_after=args.run_epochs)
    if args.quiet:
        s = result.summary
        print(f"{result.run_dir}: best {s['eval_split']} acc {s['best_eval_acc']:.4f}, "
              f"last {s['last_eval_acc']:.4f}")
    return 0
