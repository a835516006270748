"""Command-line dispatch: `python -m train <command> ...`; no command runs the default job.

Every command is a module with add_arguments(parser) and main(args) -> exit code, imported only when
used. A new command is one line in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "default": ("train.default_job", "Drainage vs CE on digits with 40% asymmetric noise (CPU, < 2 min)"),
    "run": ("train.run", "train one config (the authors' flags: --config --noise_type --noise_rate ...)"),
    "sweep": ("train.sweep", "losses x noise settings x seeds -> mean +- std table (md, csv) and figure"),
    "osr": ("train.osr", "open-set recognition: train on k known classes, AUROC / OSCR on the unknown ones"),
    "clean": ("train.clean", "dataset cleaning: rank training samples by p_d, precision / recall at k"),
    "demo789": ("train.demo789", "digits 7, 8, 9 relabelled at random to 0-6: does the drainage node take them?"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", description="Robust-loss research harness (drainage_fast).",
        epilog="With no command: the default job. `python -m train <command> -h` shows a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["default", *argv]
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).main(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:  # a bad config, flag or missing dataset: no traceback
        print(f"error ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 2
