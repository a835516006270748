"""What the command-line parsers of `python -m train` (train/cli.py, train/commands/) and
`python -m train.imagenet_scale` (train/scale/options.py) share: a flag that takes several values adds
up when it is repeated.

    --set epochs=3 --set lr=0.05      is   --set epochs=3 lr=0.05
    --seeds 1-3 --seeds 7             is   --seeds 1 2 3 7

A repeated flag once kept only its last use, so `--set loss_params.alpha=0.5 --set epochs=3` trained
with the preset's alpha and the report's Reproduce line showed only `--set epochs=3`.
"""

from __future__ import annotations

import argparse


class Extend(argparse.Action):
    """nargs="+" whose repetitions accumulate; the first use replaces the default. (argparse's own
    action="extend" appends to a non-empty default: `--seeds 4` would run the default seeds and 4.)

    argparse puts the default object itself into the namespace before parsing, so "still the default"
    is an identity test."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest, None)
        before = [] if given is None or given is self.default else list(given)
        setattr(namespace, self.dest, before + list(values))


def several(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> argparse.Action:
    """parser.add_argument(*flags, nargs="+", action=Extend, **kwargs), the help saying it repeats."""
    kwargs["help"] = kwargs.get("help", "") + " (repeat the flag to add more)"
    return parser.add_argument(*flags, nargs="+", action=kwargs.pop("action", Extend), **kwargs)
