"""Command-line dispatch: `python -m train <command> ...`; no command runs the default job.

Every command is a module with add_arguments(parser) and main(args) -> exit code, imported only when
used. A new command is one line in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .run_dirs import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "default": ("train.default_job", "Drainage vs CE on digits with 40% asymmetric noise (CPU, ~12 s)"),
    "run": ("train.run", "train one config (the authors' flags: --config --noise_type --noise_rate ...)"),
    "sweep": ("train.sweep", "losses x noise settings x seeds -> mean +- std table (md, csv) and figure"),
    "osr": ("train.osr", "open-set recognition: train on k known classes, AUROC / OSCR on the unknown ones"),
    "clean": ("train.clean", "dataset cleaning: rank training samples by p_d, precision / recall at k"),
    "demo789": ("train.demo789", "digits 7, 8, 9 relabelled at random to 0-6: does the drainage node take them?"),
}


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line (argument, value, what is accepted), exit status 2:
    the same as any other user mistake (train.run_dirs.UserError)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of epochs, seeds, jobs)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m train", description="Robust-loss research harness (drainage_fast).",
        epilog="With no command: the default job. `python -m train <command> -h` shows a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=Parser)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command; returns its exit status: 0, 2 for a user's mistake (one line on stderr, nothing
    left on disk), 130 for Ctrl-C. Anything else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["default", *argv]
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).main(args) or 0
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"python -m train {args.command}: error: {exc}", file=sys.stderr)
        return 2
