"""`python -m train.imagenet_scale`: DALI-fed DistributedDataParallel training for mini-WebVision (with
ILSVRC12 val) and Clothing1M, on one GPU, many GPUs (torchrun) or a CPU.

    python -m train.imagenet_scale                      # smoke job: generated WebVision tree, runs on a CPU
    python -m train.imagenet_scale --config webvision_drainage --data_root /data/webvision \\
        --imagenet_root /data/imagenet
    torchrun --nproc_per_node 8 -m train.imagenet_scale --config clothing1m_drainage \\
        --data_root /data/clothing1m --balanced_samples 64000
    torchrun --nproc_per_node 4 -m train.imagenet_scale --resume runs/<name>     # any world size

Run folder: config.json, scale_options.json, env.json, train.log, metrics.jsonl, last.pt (atomic, every
epoch), best.pt (weights at the best selection-split epoch), summary.json. The pieces live in
train/scale/: lists, validate, transforms, dali_pipeline, torch_loader, data, distributed, models, loop.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from .config import load_config, write_run_info
from .logs import MetricsLog, close_logger, run_logger
from .scale.distributed import barrier, broadcast_object, init_distributed, shutdown
from .scale.loop import CHECKPOINT, ScaleTrainer, write_summary
from .scale.options import ScaleOptions, build_parser, given_options, resolve
from .scale.smoke import make_smoke_tree
from .trainer import seed_everything


def _silent_logger(rank: int) -> logging.Logger:
    logger = logging.getLogger(f"train.scale.rank{rank}")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / CHECKPOINT).is_file():
            raise FileNotFoundError(f"nothing to resume: {run_dir / CHECKPOINT} does not exist")
        cfg, options, smoke = load_config(str(run_dir / "config.json")), ScaleOptions.load(run_dir, given_options(args)), False
    else:
        cfg, options, smoke = resolve(args)
    ctx = init_distributed(cfg.device)
    if not args.resume:
        name = cfg.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.dataset}-{cfg.loss}-s{cfg.seed}"
        run_dir = Path(cfg.out_dir) / broadcast_object(name, ctx)  # one folder, whatever the ranks' clocks
    if smoke:
        root = Path(cfg.out_dir) / "smoke_data" / "webvision"
        if ctx.is_main:
            make_smoke_tree(root)
        barrier(ctx)
        options.data_root = str(root)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_logger(run_dir, args.quiet)
    else:
        log = _silent_logger(ctx.rank)
    finished = False
    try:
        seed_everything(cfg.seed)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        if ctx.is_main and not args.resume:
            write_run_info(run_dir, cfg, ctx.device)
            options.save(run_dir)
        if smoke:
            log.info(f"smoke job: no --data_root, training on the generated tree {options.data_root}")
        trainer = ScaleTrainer(cfg, options, ctx, run_dir, log, show_progress=not args.quiet)
        if args.resume:
            trainer.load_checkpoint()
        metrics = MetricsLog(run_dir, tb=cfg.tb, history=trainer.history) if ctx.is_main else None
        trainer.fit(metrics, stop_after=args.run_epochs)
        if metrics is not None:
            metrics.close()
            best = write_summary(trainer, run_dir)["best"]
            at_best = ", ".join(f"{k[:-5]} {v:.2%}" for k, v in best.items() if k.endswith("_top1"))
            log.info(f"done: selected epoch {best['epoch']} on {trainer.spec.select} (top-1 {at_best}); "
                     f"outputs in {run_dir}")
        finished = True
        return 0
    except KeyboardInterrupt:
        log.warning(f"interrupted; continue with: python -m train.imagenet_scale --resume {run_dir}")
        return 130
    finally:
        if ctx.is_main:
            close_logger(log)
        shutdown(wait_for_all=finished)


if __name__ == "__main__":
    sys.exit(main())
