"""Command-line dispatch: `python -m train <command> ...`; no command runs the default job.

Every command is a module of train/commands/ with FLAGS (the shared flags it takes), add_arguments(parser)
and main(args) -> exit code, imported only when used. A new command is one line in COMMANDS.

The flags several commands take are defined once, in shared_parser (an argparse parent parser), so they
mean the same everywhere: --seeds (a list of seeds; FIRST-LAST for a range), --noise (a list of
TYPE:RATE settings), --tuning, --grid and --set (one or more items each), --runs_dir and --out. A flag
that takes several values adds up when repeated (train/arguments.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .arguments import Extend, several
from .run_dirs import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "default": (
        "train.commands.default",
        "Drainage, Deep Gamblers, DAC and CE on digits with 40% asymmetric noise (CPU, about 20 s)",
    ),
    "run": (
        "train.commands.run",
        "train one config (the authors' flags: --config --noise_type --noise_rate ...)",
    ),
    "sweep": (
        "train.commands.sweep",
        "losses x noise settings x seeds -> mean +- std table (md, csv) and figure",
    ),
    "osr": (
        "train.commands.osr",
        "open-set recognition: train on k known classes, AUROC / OSCR on the unknown ones",
    ),
    "clean": (
        "train.commands.clean",
        "dataset cleaning: rank training samples by p_d, precision / recall at k",
    ),
    "demo789": (
        "train.commands.demo789",
        "digits 7, 8, 9 relabelled at random to 0-6: does the drainage node take them?",
    ),
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


def seed_items(text: str) -> list[int]:
    """argparse type of one --seeds item: "3" -> [3]; "1-5" (a range, both ends included) -> [1, 2, 3, 4,
    5]."""
    first, sep, last = text.partition("-")
    if first.isdigit() and (last.isdigit() if sep else True) and int(first) <= int(last or first):
        return list(range(int(first), int(last or first) + 1))
    raise argparse.ArgumentTypeError(
        f"expected seeds (integers >= 0) or a range FIRST-LAST such as 1-5, got {text!r}"
    )


class SeedList(Extend):
    """--seeds (and --openset_splits, whose splits are seeded): the items' seeds (type=seed_items) in one
    list, repetitions of the flag added up; a seed given twice is refused (its runs would coincide)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, [seed for item in values for seed in item], option_string)
        seeds = getattr(namespace, self.dest)
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            parser.error(f"argument {self.option_strings[0]}: seed {', '.join(map(str, twice))} given twice")


SHARED_FLAGS = ("seeds", "noise", "tuning", "grid", "set", "runs_dir", "out")


def shared_parser(flags: tuple[str, ...] = SHARED_FLAGS) -> argparse.ArgumentParser:
    """A parent parser holding the shared `flags` (a fresh one per command, so that a command's
    set_defaults changes its own defaults only). Defaults: --seeds 1, --noise asym:0.4, nothing else."""
    p = argparse.ArgumentParser(add_help=False)
    add = {
        "seeds": lambda: several(
            p,
            "--seeds",
            type=seed_items,
            action=SeedList,
            default=[1],
            metavar="SEED",
            help="training seeds, one run per seed: a list (1 2 3) or a range FIRST-LAST (1-5 = 1 2 3 4 5) "
            "(default: %(default)s)",
        ),
        "noise": lambda: several(
            p,
            "--noise",
            default=["asym:0.4"],
            metavar="TYPE:RATE",
            help="label-noise settings, each a type with its rate (none alone: clean labels), e.g. asym:0.4 "
            "sym:0.6 instance:0.4 human:0 none (default: %(default)s)",
        ),
        "tuning": lambda: p.add_argument(
            "--tuning",
            action="store_true",
            help="train on 80%% of the training set, evaluate on the clean other 20%% (for choosing "
            "hyper-parameters; the test set is not touched)",
        ),
        "grid": lambda: several(
            p,
            "--grid",
            default=[],
            metavar="[NAME:]KEY=V1,V2",
            help="hyper-parameter axes, every combination run: for all losses / methods, or only the one "
            "NAME names, e.g. lr=0.03,0.1 drainage:loss_params.alpha=0.5,1",
        ),
        "set": lambda: several(
            p,
            "--set",
            default=[],
            metavar="KEY=VALUE",
            help="config overrides for every run, e.g. epochs=10 lr=0.05 loss_params.alpha=0.5; each value "
            "is read by the key's type (booleans: true/false, yes/no, on/off, 1/0)",
        ),
        "runs_dir": lambda: p.add_argument(
            "--runs_dir",
            default=None,
            help="the folder the run folders go in, one per run (default: a new folder under runs/ named "
            "after the command and the time)",
        ),
        "out": lambda: p.add_argument(
            "--out",
            default=None,
            help="path prefix of the report: <out>.md, <out>.csv, <out>_runs.csv, <out>.png (default: in "
            "the runs_dir)",
        ),
    }
    for flag in flags:
        add[flag]()
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m train",
        description="Robust-loss research harness (drainage_fast).",
        epilog="With no command: the default job. `python -m train <command> -h` shows a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=Parser)
    for name, (module, help_text) in COMMANDS.items():
        command_module = importlib.import_module(module)
        command = sub.add_parser(
            name,
            help=help_text.replace("%", "%%"),
            description=help_text,
            parents=[shared_parser(command_module.FLAGS)],
        )
        command_module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command; returns its exit status: 0, 2 for a user's mistake (one line on stderr, nothing
    left on disk), 130 for Ctrl-C (one line on stderr: what was kept, the command that continues). Anything
    else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["default", *argv]
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).main(args) or 0
    except KeyboardInterrupt as exc:  # Interrupted says what was kept and how to continue
        print(f"python -m train {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"python -m train {args.command}: error: {exc}", file=sys.stderr)
        return 2
