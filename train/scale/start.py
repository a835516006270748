"""Everything before the first training step of train/imagenet_scale.py, ordered so that a mistake is
found before anything is created, and a run folder is claimed by exactly one run:

    resume_run(args)               --resume: the folder, its config, options and checkpoint, and the few
                                   overrides a resumed run may take (others are refused, never ignored)
    check_runtime(cfg, options, W) flags against this machine and world size (device, input dtype,
                                   DALI, SyncBN, batch divisibility)
    refuse_taken_name(cfg, ...)    an explicit --name that exists, before minutes of list checking
    claim(cfg, options, ctx, ...)  rank 0 claims the folder (train/run_dirs.py), every rank gets its path
    startup_logger / into_run_log  lines logged before the folder exists, copied into train.log after

Every mistake is a UserError: one line naming the flag, the value and what is accepted (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import read_checkpoint
from ..config import Config, load_config, parse_override, resolved, write_config
from ..logs import close_logger, tensorboard_writer_class
from ..run_dirs import UserError, claim_run_dir, config_hash, discard_if_unused, timestamp
from .data import resolve_loader
from .distributed import DistContext, broadcast_object, uses_cuda
from .loop import BEST, CHECKPOINT
from .options import RESUMABLE_CONFIG, RESUMABLE_OPTIONS, ScaleOptions, given_options

CONFIG_FILE = "config.json"
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "history", "best")
NEW_RUN_FLAGS = ("config", "name", "out_dir", "overwrite")
# What makes a run folder worth keeping; before the first of them it holds only startup files (config,
# logs, empty metrics), and a run that stops then leaves no folder.
RESULTS = (CHECKPOINT, BEST, "summary.json")


@dataclass
class Resume:
    run_dir: Path
    cfg: Config
    options: ScaleOptions
    state: dict  # the checkpoint, read on the CPU
    changes: list[str]  # "epochs 3 -> 5", ... for the log


def read_resume_checkpoint(run_dir: Path) -> dict:
    """last.pt of run_dir (weights_only, on the CPU), or a UserError saying why it cannot be used."""
    try:
        return read_checkpoint(Path(run_dir) / CHECKPOINT, CHECKPOINT_KEYS)
    except UserError as exc:
        raise UserError(f"--resume {run_dir}: {exc}") from None


def _resume_overrides(args: argparse.Namespace, run_dir: Path) -> tuple[dict, list[str]]:
    """The --set pairs and option flags of a resume, each checked against what may change on resume."""
    pairs = dict(parse_override(item) for item in args.set)
    refused = [f"--set {k}" for k in pairs if k not in RESUMABLE_CONFIG]
    refused += [f"--{k}" for k in given_options(args) if k not in RESUMABLE_OPTIONS]
    if refused:
        raise UserError(
            f"--resume {run_dir}: {', '.join(refused)} cannot change in a resumed run (it would change "
            f"what is trained); accepted: --set {', '.join(RESUMABLE_CONFIG)} and "
            f"--{', --'.join(RESUMABLE_OPTIONS)}; anything else needs a new run"
        )
    return pairs, [f"--{k}" for k in given_options(args)]


def resume_run(args: argparse.Namespace) -> Resume:
    run_dir = Path(args.resume)
    given = [f"--{k}" for k in NEW_RUN_FLAGS if getattr(args, k)]
    if given:
        raise UserError(
            f"--resume {run_dir}: {', '.join(given)} cannot be combined with --resume (a resumed run "
            f"keeps its config and folder); drop {' '.join(given)} or start a new run without --resume"
        )
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"--resume {run_dir}: not a run folder of imagenet_scale (no {CONFIG_FILE})")
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(
            f"--resume {run_dir}: no {CHECKPOINT}; the run stopped before its first epoch ended, so "
            f"there is nothing to continue: start it again"
        )
    if args.run_epochs is not None and args.run_epochs < 1:
        raise UserError(f"--run_epochs {args.run_epochs}: must be 1 or more")
    pairs, option_flags = _resume_overrides(args, run_dir)
    try:
        stored = load_config(str(run_dir / CONFIG_FILE))
    except UserError as exc:
        raise UserError(f"--resume {run_dir}: {CONFIG_FILE} is damaged ({exc})") from None
    cfg = load_config(str(run_dir / CONFIG_FILE), pairs)  # a bad --set value: load_config names it
    state = read_resume_checkpoint(run_dir)
    if cfg.epochs != stored.epochs:
        if cfg.scheduler == "cosine":
            raise UserError(
                f"--set epochs={cfg.epochs}: the cosine schedule of this run spans its {stored.epochs} "
                f"epochs and cannot be stretched on resume; accepted: --set epochs={stored.epochs}"
            )
        if cfg.epochs < state["epoch"]:
            raise UserError(
                f"--set epochs={cfg.epochs}: the run has already trained {state['epoch']} epochs; "
                f"accepted: --set epochs=N with N >= {state['epoch']}"
            )
    changes = [
        f"{k} {getattr(stored, k)} -> {getattr(cfg, k)}"
        for k in pairs
        if getattr(stored, k) != getattr(cfg, k)
    ]
    options = ScaleOptions.load(run_dir, given_options(args))
    return Resume(run_dir, cfg, options, state, changes + option_flags)


def discard_without_results(run_dir: Path) -> bool:
    """Removes a run folder this run claimed when it holds no RESULTS yet; True if it is gone."""
    startup_files = tuple(p.name for p in run_dir.iterdir() if p.name not in RESULTS)
    discard_if_unused(run_dir, keep=startup_files)
    return not run_dir.exists()


def save_resume_changes(resume: Resume) -> None:
    """Writes the changed config and options back, so that the folder says what the run did and the next
    --resume continues with them."""
    write_config(resume.run_dir, resume.cfg)
    resume.options.save(resume.run_dir)


def check_runtime(cfg, options: ScaleOptions, world: int) -> None:
    """The flags against this machine and the number of processes (before any process group or file)."""
    cuda = uses_cuda(cfg.device)
    if options.input_dtype in ("fp16", "bf16") and not (cuda and cfg.amp):
        where = "CUDA with amp=false" if cuda else "the CPU"
        raise UserError(
            f"--input_dtype {options.input_dtype}: needs CUDA with amp=true (the model computes in fp32 "
            f"on {where}); accepted here: auto or fp32"
        )
    if options.dali_device == "mixed" and not cuda:
        raise UserError(
            "--dali_device mixed: decodes on a GPU, and this run uses the CPU; accepted here: auto or cpu"
        )
    if options.sync_bn and world > 1 and not cuda:
        raise UserError(
            "--sync_bn: needs CUDA (torch's SyncBatchNorm has no CPU implementation); drop it for a CPU run"
        )
    resolve_loader(options)
    if cfg.tb:
        tensorboard_writer_class()
    for name, size in (("batch_size", cfg.batch_size), ("eval_batch_size", cfg.eval_batch_size)):
        if size % world:
            raise UserError(
                f"config {name}={size} (global) is not divisible by the world size {world}: "
                f"accepted: a multiple of {world} (--set {name}=N)"
            )


def refuse_taken_name(cfg, overwrite: bool) -> None:
    """An explicit name that exists is refused now, not after the list check (the claim itself stays the
    atomic test); --overwrite deletes only what looks like a run folder."""
    if cfg.name is None:
        return
    path = Path(cfg.out_dir) / cfg.name
    if path.exists() and not overwrite:
        raise UserError(
            f"--name {cfg.name}: run folder {path} already exists; choose another --name, continue it "
            f"with --resume {path}, or replace it with --overwrite"
        )
    if overwrite and path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        raise UserError(f"--overwrite: {path} is not a run folder (no {CONFIG_FILE}); it is not deleted")


def default_name(cfg, options: ScaleOptions) -> str:
    """<time>-<dataset>-<loss>-s<seed>-<hash of config and options>: readable, and different for
    different settings started in the same second (equal ones get -2, -3 from the claim)."""
    digest = config_hash({"config": resolved(cfg), "options": asdict(options)})
    return f"{timestamp()}-{cfg.dataset}-{cfg.loss}-s{cfg.seed}-{digest}"


def claim(cfg, options: ScaleOptions, ctx: DistContext, overwrite: bool) -> Path:
    """Rank 0 claims the run folder; every rank returns its path or raises rank 0's UserError."""
    outcome = None
    if ctx.is_main:
        try:
            path = (
                claim_run_dir(cfg.out_dir, cfg.name, overwrite=overwrite)
                if cfg.name
                else claim_run_dir(cfg.out_dir, default_name(cfg, options), unique=True)
            )
            outcome = ("path", str(path))
        except UserError as exc:
            outcome = ("error", str(exc))
        except OSError as exc:
            outcome = ("error", f"--out_dir {cfg.out_dir}: cannot create the run folder ({exc})")
    kind, value = broadcast_object(outcome, ctx)
    if kind == "error":
        raise UserError(value)
    return Path(value)


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def startup_logger(quiet: bool, is_main: bool) -> logging.Logger:
    """The log before the run folder exists: rank 0 prints (unless quiet) and keeps the lines for
    into_run_log; other ranks log nothing."""
    logger = logging.getLogger("train.scale.startup")
    close_logger(logger)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if is_main:
        logger.addHandler(_Kept())
        if not quiet:
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(console)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def into_run_log(startup: logging.Logger, log: logging.Logger) -> None:
    """Copies the startup lines into the run's log files, not to the console (printed already)."""
    for handler in startup.handlers:
        for record in getattr(handler, "records", []):
            record.console = False  # train/logs.py: the console handler skips such records
            log.handle(record)
    close_logger(startup)
