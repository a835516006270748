"""`python -m train.imagenet_scale`: DALI-fed DistributedDataParallel training for mini-WebVision (with
ILSVRC12 val) and Clothing1M, on one GPU, many GPUs (torchrun) or a CPU.

    python -m train.imagenet_scale                      # smoke job: generated WebVision tree, runs on a CPU
    python -m train.imagenet_scale --config webvision_drainage --data_root /data/webvision \\
        --imagenet_root /data/imagenet
    torchrun --nproc_per_node 8 -m train.imagenet_scale --config clothing1m_drainage \\
        --data_root /data/clothing1m --balanced_samples 64000
    torchrun --nproc_per_node 4 -m train.imagenet_scale --resume runs/<name>     # any world size

Order of a start: flags, config and (for --resume) the run folder and its checkpoint are checked; then
the lists are parsed and validated; only then is the run folder claimed (train/run_dirs.py: a fresh
folder per run, an existing name refused without --overwrite). A mistake found on the way is one line
on stderr and exit status 2, and leaves no run folder; a failure after the claim is written to the
run's log, and a folder without a checkpoint is removed again.

Run folder: config.json, scale_options.json, env.json, train.log, metrics.jsonl, last.pt (atomic, every
epoch), best.pt (weights at the best selection-split epoch), summary.json. The pieces live in
train/scale/: start, lists, validate, transforms, dali_pipeline, torch_loader, data, distributed,
models, loop.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from ..config import write_run_info
from ..logs import MetricsLog, close_logger, run_logger
from ..run_dirs import UserError
from ..trainer import seed_everything
from .data import check_epoch_fits_batch, load_lists
from .distributed import barrier, init_distributed, shutdown, world_size
from .loop import ScaleTrainer, write_summary
from .options import build_parser, resolve
from .smoke import make_smoke_tree
from .start import (
    check_runtime,
    claim,
    discard_without_results,
    into_run_log,
    refuse_taken_name,
    resume_run,
    save_resume_changes,
    startup_logger,
)
from .validate import DataFileError, default_cache_dir

PROG = "python -m train.imagenet_scale"


def _silent_logger(rank: int) -> logging.Logger:
    logger = logging.getLogger(f"train.scale.rank{rank}")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def _to_user(line: str, every_rank: bool = False) -> None:
    """One line on stderr. A mistake in the flags or the data is found alike by every rank (the lists'
    checks are agreed on), so rank 0 says it alone; a file that fails mid-epoch fails on one rank."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or every_rank:
        print(f"{PROG}: {line}" if rank == "0" else f"{PROG} (rank {rank}): {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except UserError as exc:
        _to_user(f"error: {exc}")
        return 2
    except DataFileError as exc:
        _to_user(f"error: {exc}", every_rank=True)
        return 1


def train(args) -> int:
    resume = resume_run(args) if args.resume else None
    if resume:
        cfg, options, smoke = resume.cfg, resume.options, False
    else:
        cfg, options, smoke = resolve(args)
        refuse_taken_name(cfg, args.overwrite)
    check_runtime(cfg, options, world_size())
    ctx = init_distributed(cfg.device, cfg.cpu_threads)
    log = startup_logger(args.quiet, ctx.is_main)
    run_dir, trainer, finished = None, None, False
    try:
        spec = _lists(cfg, options, smoke, ctx, log)
        run_dir = resume.run_dir if resume else claim(cfg, options, ctx, args.overwrite)
        startup, log = log, run_logger(run_dir, args.quiet) if ctx.is_main else _silent_logger(ctx.rank)
        into_run_log(startup, log)
        if ctx.is_main:
            _record_start(run_dir, cfg, options, resume, ctx, log)
        seed_everything(cfg.seed)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        trainer = ScaleTrainer(cfg, options, ctx, run_dir, log, spec, show_progress=not args.quiet)
        if resume:
            trainer.restore(resume.state)
        metrics = MetricsLog(run_dir, tb=cfg.tb, history=trainer.history) if ctx.is_main else None
        trainer.fit(metrics, stop_after=args.run_epochs)
        if metrics is not None:
            metrics.close()
            summary = write_summary(trainer, run_dir)
            best, reported = summary["best"], summary["reported"]
            at_best = ", ".join(f"{k[:-5]} {v:.2%}" for k, v in best.items() if k.endswith("_top1"))
            if trainer.spec.report and reported["top1_last_epoch"] is not None:  # Clothing1M: its test split
                _result(
                    log,
                    f"result: {reported['split']} top-1 {reported['top1_last_epoch']:.2%} at the "
                    f"last epoch {reported['last_epoch']} (the official metric); "
                    f"{reported['top1_best_val_epoch']:.2%} at the best {reported['selected_on']} "
                    f"epoch {reported['best_val_epoch']}",
                    args.quiet,
                )
            _result(
                log,
                f"done: selected epoch {best['epoch']} on {trainer.spec.select} (top-1 {at_best}); "
                f"outputs in {run_dir}",
                args.quiet,
            )
        finished = True
        return 0
    except KeyboardInterrupt:
        if run_dir is not None and ctx.is_main:
            _result(log, _after_failure(run_dir, trainer, resume, "interrupted"), args.quiet, sys.stderr)
        return 130
    except (UserError, DataFileError) as exc:
        if run_dir is not None and ctx.is_main:
            log.error(f"error: {exc}", extra={"console": False})
            raise type(exc)(f"{exc}; {_after_failure(run_dir, trainer, resume, 'stopped')}") from None
        raise
    except BaseException:
        if run_dir is not None and ctx.is_main:  # a bug: its traceback goes to the log and to stderr
            log.exception("failed", extra={"console": False})
            print(_after_failure(run_dir, trainer, resume, "failed"), file=sys.stderr)
        raise
    finally:
        if ctx.is_main:
            close_logger(log)
        shutdown(wait_for_all=finished)


def _lists(cfg, options, smoke: bool, ctx, log: logging.Logger):
    """The validated lists (train/scale/data.py), of the generated tree for the smoke job; every check
    that needs them is done here, before the run folder is claimed."""
    if smoke:
        root = Path(cfg.out_dir) / "smoke_data" / "webvision"
        if ctx.is_main:
            make_smoke_tree(root)
        barrier(ctx)
        options.data_root = str(root)
        log.info(f"smoke job: no --data_root, training on the generated tree {options.data_root}")
    spec = load_lists(cfg, options, ctx, default_cache_dir(), log)
    check_epoch_fits_batch(spec, cfg, options)
    return spec


def _record_start(run_dir: Path, cfg, options, resume, ctx, log: logging.Logger) -> None:
    """A new run's config.json, env.json and scale_options.json; a resumed run's changes."""
    if resume is None:
        write_run_info(run_dir, cfg, ctx.device)
        options.save(run_dir)
    elif resume.changes:
        save_resume_changes(resume)
        log.info(f"resumed with changes: {', '.join(resume.changes)}")


def _result(log: logging.Logger, line: str, quiet: bool, stream=None) -> None:
    """A line for the log and the user (stdout, or `stream`); with --quiet the log prints nothing, so it
    is printed here."""
    log.info(line)
    if quiet:
        print(line, file=stream or sys.stdout)


def _after_failure(run_dir: Path, trainer: ScaleTrainer | None, resume, what: str) -> str:
    """What became of the run folder when the run ends early: a new run's folder without a checkpoint is
    removed (it holds nothing of value), any other is kept for --resume."""
    if resume is None and discard_without_results(run_dir):
        return f"{what} before the first checkpoint: the run folder {run_dir} was removed"
    epoch = trainer.epoch if trainer is not None else resume.state["epoch"]
    return f"{what} after epoch {epoch}; continue with: {PROG} --resume {run_dir}"


if __name__ == "__main__":
    sys.exit(main())
