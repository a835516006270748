"""What the multi-run commands (sweep, clean, osr, demo789, the default job) share: the --noise and --grid
syntax, the preset a (dataset, loss) starts from, the best grid point, and the command line that
reproduces a job.

    parse_noise("asym:0.4") -> ("asym", 0.4)              a rate is required (only "none" goes without)
    parse_grid(["lr=0.03,0.1", "drainage:loss_params.alpha=0.5,1"]) -> [(None, "lr", [0.03, 0.1]), ...]
    grid_points("drainage", axes) -> [{"lr": 0.03, "loss_params.alpha": 0.5}, ...]
    config_for("digits", "gce", ["seed=2"]) -> Config    digits_gce.json, else digits.json with loss=gce
    plan_runs("digits", losses, noises, seeds, grid=...)  loss x grid point x noise x seed, checked configs
    best_points(agg, "loss", "last_eval_acc_mean")       each loss's grid point with the highest mean
    reproducing_command("sweep", args, FLAGS)            "python -m train sweep --dataset digits ..."
    job_dir(args.runs_dir, "sweep-digits")               the folder of the command's run folders

Every mistake in these arguments is a UserError naming the argument and what it takes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import CONFIG_DIR, Config, json_or_word
from .losses import canonical_loss_name, name_key
from .run_dirs import UserError, claim_run_dir, timestamp


def distinct(flag: str, items: Sequence, key: Callable = lambda item: item) -> list:
    """items as a list, refusing with a UserError an item given twice (by key: a loss by its canonical
    name, a noise setting by its parsed rate): the two would be the same runs, trained twice into two
    folders, and counted twice in the report."""
    keys = [key(item) for item in items]
    twice = [item for n, item in enumerate(items) if keys[n] in keys[:n]]
    if twice:
        raise UserError(
            f"{flag} {twice[0]}: given twice (as {items[keys.index(key(twice[0]))]}); give it once"
        )
    return list(items)


def resolved_path(path: str | Path) -> Path:
    """The key under which two spellings of one file or folder are the same (runs/a, ./runs/a/)."""
    return Path(path).resolve()


def parse_noise(item: str) -> tuple[str, float]:
    """ "TYPE:RATE" -> (type, rate); "none" alone is clean labels. A noise type without its rate is refused:
    `asym` alone once ran silently at rate 0."""
    from .noise import NOISE_TYPES

    kind, sep, rate = item.partition(":")
    if kind not in NOISE_TYPES:
        raise UserError(f"--noise {item}: the noise type must be one of {NOISE_TYPES}, e.g. asym:0.4")
    if kind == "none" and not sep:
        return kind, 0.0
    try:
        value = float(rate)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise UserError(
            f"--noise {item}: a noise setting is TYPE:RATE with a rate in [0, 1], e.g. {kind}:0.4"
        )
    return kind, value


def parse_noises(items: list[str]) -> list[tuple[str, float]]:
    """--noise's settings parsed (parse_noise), refusing one given twice (asym:0.4 and asym:0.40)."""
    distinct("--noise", items, parse_noise)
    return [parse_noise(item) for item in items]


def parse_grid(items: list[str]) -> list[tuple[str | None, str, list]]:
    """["drainage:loss_params.alpha=0.5,1", "lr=0.1"] -> [("drainage", "loss_params.alpha", [0.5, 1]), ...]
    Values are JSON where they read as JSON (numbers, true, null, [...]), else words; each run's config
    then reads them by the key's declared type."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        owner, _, key = key.rpartition(":")
        if not sep or not key or not values or "" in values.split(","):
            raise UserError(
                f"--grid {item}: an axis is [LOSS:]KEY=V1,V2,..., e.g. lr=0.03,0.1 or "
                "drainage:loss_params.alpha=0.5,1"
            )
        parsed = distinct(f"--grid {item}: value", [json_or_word(v) for v in values.split(",")])
        axes.append((owner or None, key, parsed))
    distinct("--grid", [f"{owner}:{key}" if owner else key for owner, key, _ in axes])
    return axes


def grid_points(loss: str, axes) -> list[dict]:
    """Every combination of the axes that apply to `loss` (one empty point when none do); an axis's owner
    names it in any spelling (NCE+MAE:..., losses.name_key)."""
    mine = [
        (key, values) for owner, key, values in axes if owner is None or name_key(owner) == name_key(loss)
    ]
    return [dict(zip([k for k, _ in mine], combo)) for combo in itertools.product(*[v for _, v in mine])]


def check_owners(axes, names: list[str], what: str) -> None:
    """A UserError for a grid axis whose owner is none of `names` (the losses or methods of the job): it
    would apply to nothing, silently."""
    for owner, key, _ in axes:
        if owner is not None and name_key(owner) not in {name_key(n) for n in names}:
            raise UserError(
                f"--grid {owner}:{key}=...: {owner} is none of the {what} of this job ({' '.join(names)})"
            )


def point_tag(point: dict) -> str:
    return ",".join(f"{k.replace('loss_params.', '')}={v}" for k, v in point.items())


def point_overrides(point: dict) -> list[str]:
    """A grid point as key=value overrides (JSON values: a word stays one word)."""
    return [f"{k}={json.dumps(v)}" for k, v in point.items()]


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


@dataclass(frozen=True)
class PlannedRun:
    """One run of a noisy-label job (sweep, clean): a loss at a grid point, a noise setting and a seed."""

    loss: str
    point: dict
    noise: tuple[str, float]
    seed: int
    cfg: Config

    @property
    def labels(self) -> dict:
        """loss, params (the grid point's tag), noise ("TYPE:RATE") and seed, as report rows name them."""
        kind, rate = self.noise
        return {
            "loss": self.loss,
            "params": point_tag(self.point),
            "noise": f"{kind}:{rate:g}",
            "seed": self.seed,
        }

    @property
    def folder(self) -> Path:
        """Where the run goes under runs_dir (its stem: s<seed>, s<seed>-2, ...)."""
        kind, rate = self.noise
        return Path(f"{self.loss}[{point_tag(self.point)}]" if self.point else self.loss) / f"{kind}{rate:g}"


def plan_runs(
    dataset: str,
    losses: list[str],
    noises: list[tuple[str, float]],
    seeds: list[int],
    *,
    tuning: bool = False,
    grid: list[str] = (),
    overrides: list[str] = (),
) -> list[PlannedRun]:
    """Every loss x grid point x noise x seed as a validated config (a UserError for any mistake, a loss
    given twice included)."""
    given = distinct("--losses", losses, lambda loss: canonical_loss_name(loss, "--losses "))
    losses = [canonical_loss_name(loss) for loss in given]
    axes = parse_grid(list(grid))
    check_owners(axes, losses, "losses")
    plan = []
    for loss in losses:
        for point in grid_points(loss, axes):
            for kind, rate in noises:
                for seed in seeds:
                    cfg = config_for(
                        dataset,
                        loss,
                        [
                            f"noise_type={kind}",
                            f"noise_rate={rate}",
                            f"seed={seed}",
                            f"tuning={tuning}",
                            "checkpoint=false",
                            *overrides,
                            *point_overrides(point),
                        ],
                    )
                    plan.append(PlannedRun(loss, point, (kind, rate), seed, cfg))
    return plan


def best_points(
    agg: list[dict], group: str, metric: str, keep: Callable[[dict], bool] = lambda row: True
) -> dict[str, tuple[str, float]]:
    """group value (a loss, a method) -> (grid point tag, score): the "params" whose kept aggregated rows
    have the highest mean `metric` (over the noise settings, for a sweep); the first such point on a tie."""
    chosen = {}
    for name in dict.fromkeys(a[group] for a in agg):
        scores: dict[str, list[float]] = {}
        for a in agg:
            if a[group] == name and keep(a):
                scores.setdefault(a["params"], []).append(a[metric])
        if scores:
            best = max(scores, key=lambda params: np.mean(scores[params]))
            chosen[name] = (best, float(np.mean(scores[best])))
    return chosen


# the flags that place a job's outputs (and, --jobs, how it ran): a command that continues the job needs them
JOB_FLAGS = ("runs_dir", "out", "split_dir", "title", "jobs")


def reproducing_command(command: str, args, flags: Sequence[str], continue_in: Path | None = None) -> str:
    """`python -m train <command>` with the given flags as `args` holds them: a list as its items, True as
    the bare flag; None, False and [] left out. Each word is shell-quoted where it needs to be.

    continue_in: the job's runs_dir; the command then also names it and the JOB_FLAGS that were given
    (--out, --split_dir, --title; --jobs when not 1): the command that continues the job."""
    if continue_in is not None:
        given = {flag: getattr(args, flag, None) for flag in JOB_FLAGS}
        given |= {"runs_dir": str(continue_in), "jobs": None if given["jobs"] == 1 else given["jobs"]}
        args = argparse.Namespace(**{**vars(args), **given})
        flags = [*flags, *JOB_FLAGS]
    words = ["python", "-m", "train", command]
    for flag in flags:
        value = getattr(args, flag)
        if value is None or value is False or (isinstance(value, (list, tuple)) and not value):
            continue
        words.append(f"--{flag}")
        if value is not True:
            items = value if isinstance(value, (list, tuple)) else [value]
            words += [f"{v:g}" if isinstance(v, float) else str(v) for v in items]
    return " ".join(shlex.quote(w) for w in words)


def job_dir(given: str | None, stem: str, parent: str | Path = "runs") -> Path:
    """The folder a multi-run command puts its run folders in. A given one (--runs_dir) is shared on
    purpose: a rerun reuses its finished runs, and every run claims a folder of its own inside it. Without
    one, parent/<stem>-<time> is claimed (-2, -3, ... for a command started in the same second)."""
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        return Path(given)
    return claim_run_dir(parent, f"{stem}-{timestamp()}", unique=True)
