"""One experiment end to end: run_experiment(cfg) builds data, model and loss, trains, and writes the
run folder. The entry point that `train run`, `train sweep` and the default job call.

Run folder (runs/<name>/):
    config.json  env.json        the resolved config; versions, git commit, device
    noise.json   labels.npz       the noise record (realised rate, transition counts); the labels trained on
    train.log    metrics.jsonl   readable log; one JSON row per evaluated epoch
    last.pt                      the atomic per-epoch checkpoint (--resume)
    scores.npz                   final per-sample training-set scores (p_d, p_given, pred, labels)
    summary.json                 best / last accuracy and the final training-set statistics
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Config, load_config, write_run_info
from .data import NoisyDataset, build_data
from .logs import close_logger, run_logger
from .losses import build_loss, num_outputs
from .models import build_model
from .trainer import CHECKPOINT, Trainer, resolve_device, seed_everything


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    history: list[dict]


def default_run_name(cfg: Config) -> str:
    noise = "human" if cfg.dataset.endswith("n") else f"{cfg.noise_type}{cfg.noise_rate:g}"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.dataset}-{cfg.loss}-{noise}-s{cfg.seed}"


def save_noise(run_dir: Path, data: NoisyDataset) -> None:
    data.noise.save(run_dir / "noise.json")
    # the labels trained on; index = positions in the original training set (a tuning run uses 80%)
    np.savez(run_dir / "labels.npz", index=data.train_index.numpy(), noisy=data.train_y.numpy(),
             clean=data.train_y_clean.numpy())


def summarise(trainer: Trainer, scores: dict) -> dict:
    history = trainer.history
    last = history[-1] if history else {}
    summary = {
        "best_eval_acc": trainer.best["eval_acc"], "best_epoch": trainer.best["epoch"],
        "last_eval_acc": last.get("eval_acc"), "eval_split": trainer.data.eval_split,
        "epochs": trainer.epoch, "realised_noise_rate": float(trainer.data.flipped.float().mean()),
        "train_time_s": last.get("elapsed_s"),
    }
    summary.update({k: v for k, v in last.items() if k.startswith(("pd_", "precision_at_k", "memorized",
                                                                    "eval_drained", "train_acc_clean"))})
    summary.update(trainer.training_set_stats(scores))
    return summary


@contextmanager
def run_session(cfg: Config, run_dir: Path, quiet: bool):
    """The frame of every run: the run folder and its logger, cfg's CPU threads, device, seeds and
    cuDNN determinism; yields (logger, device) and restores the thread count afterwards."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = run_logger(run_dir, quiet)
    threads = torch.get_num_threads()
    try:
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield logger, device
    finally:
        torch.set_num_threads(threads)
        close_logger(logger)


def run_experiment(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False,
                   quiet: bool = False, stop_after: int | None = None, progress: bool = True) -> RunResult:
    """Trains cfg (or continues run_dir when resume=True) and returns the summary and history.

    stop_after: stop after this epoch (a chunked job; continue later with resume=True).
    """
    run_dir = Path(run_dir) if run_dir else Path(cfg.out_dir) / (cfg.name or default_run_name(cfg))
    if resume and not (run_dir / CHECKPOINT).exists():
        raise FileNotFoundError(f"nothing to resume: {run_dir / CHECKPOINT} does not exist")
    with run_session(cfg, run_dir, quiet) as (logger, device):
        data = build_data(cfg)
        if not resume:
            write_run_info(run_dir, cfg, device)
            save_noise(run_dir, data)
        model = build_model(cfg.model, num_outputs(cfg.loss, data.num_classes), cfg.pretrained)
        loss_fn = build_loss(cfg.loss, data.num_classes, **cfg.loss_params)
        if cfg.loss == "drainage":  # resolving "auto" may build the C++ kernels once (cached per machine)
            from drainage_fast import backends

            logger.info(f"drainage_fast backend: {backends.resolve(loss_fn.backend, device).NAME}")
        logger.info(f"{run_dir}: {cfg.loss} on {cfg.dataset} ({len(data.train_y)} train / "
                    f"{len(data.eval_y)} {data.eval_split}), noise {data.noise.noise_type} requested "
                    f"{cfg.noise_rate:g} realised {data.flipped.float().mean():.3f}, {cfg.model} on {device}")
        trainer = Trainer(cfg, data, model, loss_fn, run_dir, device, logger,
                          show_progress=progress and not quiet)
        history = trainer.fit(resume=resume, stop_after=stop_after)
        scores = trainer.training_set_scores()
        np.savez(run_dir / "scores.npz", index=data.train_index.numpy(), noisy=data.train_y.numpy(),
                 clean=data.train_y_clean.numpy(), **{k: v.numpy() for k, v in scores.items()})
        summary = summarise(trainer, scores)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        logger.info(f"done: best {data.eval_split} acc {summary['best_eval_acc']:.2%} (epoch "
                    f"{summary['best_epoch']}), last {summary['last_eval_acc']:.2%}; outputs in {run_dir}")
        return RunResult(run_dir, summary, history)


def resume_experiment(run_dir: str | Path, **kwargs) -> RunResult:
    """Continues an interrupted run from run_dir/last.pt with the config stored beside it."""
    cfg = load_config(str(Path(run_dir) / "config.json"))
    return run_experiment(cfg, run_dir, resume=True, **kwargs)
