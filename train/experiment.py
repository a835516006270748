"""One experiment end to end: run_experiment(cfg) builds data, model and loss, trains, and writes the
run folder. The entry point that `train run`, `train sweep` and the default job call.

Run folder (runs/<name>/):
    config.json  env.json        the resolved config; versions, git commit, device
    noise.json   labels.npz       the noise record (realised rate, transition counts); the labels trained on
    train.log                    readable log (with the traceback of an error that ended the run)
    metrics.jsonl metrics.csv    one row per evaluated epoch
    last.pt      best.pt         the atomic per-epoch checkpoint (--resume); the best epoch's weights
    scores.npz                   final per-sample training-set scores (p_d, p_given, pred, labels)
    eval_scores.npz              per evaluation image: label, pred, correct, drained, each confidence
                                 as its logarithm (the selective metrics recompute from it)
    predictions.csv              with coverage set: per test image the predicted class, its (log)
                                 confidence and whether the abstention rule abstains
                                 (Trainer.coverage_rule)
    summary.json                 best / last accuracy, AURC and the selective risks, the final
                                 training-set statistics (a finished run); the coverage rule's numbers

A run folder belongs to one run (train/run_dirs.py): a new run claims a fresh folder, and only after
everything a user can get wrong (config, device, loss backend, TensorBoard, dataset files) was checked,
so a mistake leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import read_checkpoint
from .config import Config, load_config, parse_override, resolved, write_config, write_run_info
from .data import NoisyDataset, build_data, load_labelled, noise_type_of, prepare_batch
from .logs import close_logger, run_logger, tensorboard_writer_class
from .losses import ABSTAINING, build_loss, num_outputs
from .models import build_model
from .report.tables import write_csv
from .run_dirs import (
    LOCK,
    Interrupted,
    UserError,
    atomic_write_text,
    claim_run_dir,
    config_hash,
    discard_if_unused,
    lock_run_dir,
    timestamp,
    unlock_run_dir,
)
from .trainer import CHECKPOINT, CHECKPOINT_KEYS, Trainer, resolve_device, seed_everything

# what a resume may change: nothing an epoch already trained depends on (a cosine schedule is
# re-planned for the new length, see Trainer.load_state)
RESUMABLE_KEYS = ("epochs", "eval_freq")


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    history: list[dict]


def default_run_name(cfg: Config) -> str:
    """<time>-<dataset>-<loss>-<noise>-s<seed>-<hash of the resolved config>: two runs that differ in any
    setting differ in name; two equal ones started in the same second get -2, -3, ... (claim_run_dir)."""
    noise = "human" if noise_type_of(cfg) == "human" else f"{cfg.noise_type}{cfg.noise_rate:g}"
    return f"{timestamp()}-{cfg.dataset}-{cfg.loss}-{noise}-s{cfg.seed}-{config_hash(resolved(cfg))}"


def claim_new_run_dir(cfg: Config, run_dir: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """The folder of a new run, claimed atomically: run_dir (refused when it exists and is not empty, unless
    overwrite); without run_dir, cfg.out_dir / cfg.name, else a unique default name under cfg.out_dir. An
    empty existing run_dir (its lock file aside) is one the caller claimed and is used as it is."""
    if run_dir is None:
        if cfg.name:
            return claim_run_dir(cfg.out_dir, cfg.name, overwrite=overwrite)
        return claim_run_dir(cfg.out_dir, default_run_name(cfg), unique=True)
    run_dir = Path(run_dir)
    if run_dir.is_dir() and not overwrite and all(p.name == LOCK for p in run_dir.iterdir()):
        return run_dir
    return claim_run_dir(run_dir.parent, run_dir.name, overwrite=overwrite)


def check_runtime(cfg: Config) -> torch.device:
    """What Config.validate cannot check without the machine: the device exists, the backend of a fused
    (abstaining) loss runs on it, TensorBoard is installed when tb=true. Returns the device; raises
    UserError."""
    device = resolve_device(cfg.device)
    backend = cfg.loss_params.get("backend", "auto")
    if cfg.loss in ABSTAINING and backend != "auto":
        from drainage_fast import backends

        ok, reason = backends.availability(backend, device)
        if not ok:
            raise UserError(
                f"loss_params.backend={backend}: cannot run on {device} ({reason}); "
                "use loss_params.backend=auto"
            )
    if cfg.tb:
        tensorboard_writer_class()
    return device


def check_model_fits(model: nn.Module, data, cfg: Config) -> None:
    """One forward pass of two training images through model in eval mode (no RNG drawn, no BatchNorm
    statistics changed). A model that cannot take the dataset's images (cnn8 on 1 x 8 x 8 digits), or
    emits another number of outputs than cfg's loss needs, is a UserError before any folder exists.
    data: a RawDataset or NoisyDataset."""
    x = prepare_batch(data.train_x[:2], pixel_scale=data.pixel_scale, mean=data.mean, std=data.std)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shape = tuple(model(x).shape)
    except RuntimeError as exc:  # torch's shape errors
        raise UserError(
            f"model={cfg.model}: cannot take the {cfg.dataset} images, of shape {tuple(x.shape[1:])} "
            f"({str(exc).splitlines()[0]})"
        ) from None
    finally:
        model.train(was_training)
    C = data.num_classes
    K = num_outputs(cfg.loss, C)
    if shape != (len(x), K):
        # checked here, before training: the library would only object to a batch holding class C - 1
        # (then the drainage index), possibly epochs in
        need = (
            f"{K} outputs ({C} class logits and the abstain (drainage) output: K = C + 1)"
            if K > C
            else f"{C}, one a class"
        )
        emits = shape[1] if len(shape) == 2 else shape[1:]
        raise UserError(
            f"model={cfg.model}: emits {emits} outputs per image; loss={cfg.loss} on {cfg.dataset} "
            f"({C} classes) needs {need}"
        )


def check_plan(cfgs: list[Config]) -> None:
    """What a multi-run command checks before it makes its first folder: check_runtime for every config,
    the dataset files of each distinct dataset (loaded once) and that each model fits its dataset."""
    datasets, fitted = {}, set()
    for cfg in cfgs:
        check_runtime(cfg)
        key = (cfg.dataset, cfg.data_root, cfg.download, cfg.human_label, noise_type_of(cfg))
        if key not in datasets:
            datasets[key] = load_labelled(cfg)[0]
        if (key, cfg.model, cfg.loss) not in fitted:  # no pretrained weights: the same shapes, no download
            raw = datasets[key]
            check_model_fits(build_model(cfg.model, num_outputs(cfg.loss, raw.num_classes)), raw, cfg)
            fitted.add((key, cfg.model, cfg.loss))


@contextmanager
def cpu_threads(n: int):
    """torch's intra-op threads set to n (0: left as they are) for the block, then restored."""
    before = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def run_log(run_dir: Path, quiet: bool, continue_with: str | None = None):
    """The run's logger (train.log, and the console unless quiet). An error that ends the run is written to
    train.log with its traceback before it propagates; a folder it leaves holding nothing but train.log
    (the run never started) is removed.

    Ctrl-C becomes Interrupted with one line: with a checkpoint, what it holds and `continue_with` (the
    command that continues the run; default: `train run --resume`), also written to train.log; without
    one (cut before the first checkpoint), the folder is removed, since it holds nothing to continue.
    """
    logger = run_logger(run_dir, quiet)
    try:
        yield logger
    except KeyboardInterrupt as exc:
        if not (run_dir / CHECKPOINT).is_file():
            close_logger(logger)
            shutil.rmtree(run_dir, ignore_errors=True)
            raise Interrupted(f"interrupted before the first checkpoint; {run_dir} was removed") from None
        command = continue_with or f"python -m train run --resume {run_dir}"
        line = f"{str(exc) or 'interrupted'}; continue with: {command}"
        logger.warning(line, extra={"console": False})
        raise Interrupted(line) from None
    except BaseException:
        logger.exception("the run stopped with an error")
        close_logger(logger)
        discard_if_unused(run_dir, keep=("train.log",))
        raise
    finally:
        close_logger(logger)


def seed_run(cfg: Config) -> None:
    """Every RNG seeded from cfg.seed, and cuDNN's deterministic kernels when cfg asks for them."""
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


@contextmanager
def run_session(cfg: Config, run_dir: Path, quiet: bool, continue_with: str | None = None):
    """The frame of a run in a folder its caller claimed and whose data it built: cfg's CPU threads, the
    seeds (seed_run) and the run's logger (run_log); yields the logger."""
    with cpu_threads(cfg.cpu_threads), run_log(run_dir, quiet, continue_with) as logger:
        seed_run(cfg)
        yield logger


def save_noise(run_dir: Path, data: NoisyDataset) -> None:
    data.noise.save(run_dir / "noise.json")
    # the labels trained on; index = positions in the original training set (a tuning run uses 80%)
    np.savez(
        run_dir / "labels.npz",
        index=data.train_index.numpy(),
        noisy=data.train_y.numpy(),
        clean=data.train_y_clean.numpy(),
    )


def summarise(trainer: Trainer, scores: dict) -> dict:
    history = trainer.history
    last = history[-1] if history else {}
    summary = {
        "best_eval_acc": trainer.best["eval_acc"],
        "best_epoch": trainer.best["epoch"],
        "last_eval_acc": last.get("eval_acc"),
        "eval_split": trainer.data.eval_split,
        "epochs": trainer.epoch,
        "realised_noise_rate": float(trainer.data.flipped.float().mean()),
        "train_time_s": last.get("elapsed_s"),
    }
    kept = (
        "pd_",
        "precision_at_k",
        "memorized",
        "eval_drained",
        "train_acc_clean",
        "eval_aurc",
        "eval_e_aurc",
    )
    summary.update({k: v for k, v in last.items() if k.startswith((*kept, "eval_risk@"))})
    summary.update(trainer.training_set_stats(scores))
    return summary


def run_experiment(
    cfg: Config,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    continue_with: str | None = None,
) -> RunResult:
    """Trains cfg in a new run folder (claim_new_run_dir(cfg, run_dir, overwrite=...)), or with resume=True
    continues the run in run_dir from its last.pt; returns the summary and history.

    Everything a user can get wrong is checked before the folder is claimed (or, on resume, before a
    file in it changes); those mistakes are UserErrors. stop_after: stop after this epoch (a chunked job;
    continue later with resume=True). continue_with: the command that continues the run if it is cut
    (run_log; a multi-run command gives its own).
    """
    if stop_after is not None and stop_after < 1:
        raise UserError(f"--run_epochs {stop_after}: must be an epoch >= 1")
    with cpu_threads(cfg.cpu_threads):
        device = check_runtime(cfg)
        state = resume_state(Path(run_dir), cfg, device) if resume else None
        seed_run(cfg)  # then data, then the model: the order every run since the first has used
        data = build_data(cfg)
        model = build_model(cfg.model, num_outputs(cfg.loss, data.num_classes), cfg.pretrained)
        check_model_fits(model, data, cfg)
        loss_fn = build_loss(cfg.loss, data.num_classes, **cfg.loss_params)
        run_dir = Path(run_dir) if resume else claim_new_run_dir(cfg, run_dir, overwrite=overwrite)
        with run_log(run_dir, quiet, continue_with) as logger:
            if resume:
                write_config(run_dir, cfg)  # a resume may have changed epochs / eval_freq
            else:
                write_run_info(run_dir, cfg, device)
                save_noise(run_dir, data)
            if cfg.loss in ABSTAINING:  # resolving "auto" may build the C++ kernels once (cached per machine)
                from drainage_fast import backends

                logger.info(f"drainage_fast backend: {backends.resolve(loss_fn.backend, device).NAME}")
            logger.info(
                f"{run_dir}: {cfg.loss} on {cfg.dataset} ({len(data.train_y)} train / "
                f"{len(data.eval_y)} {data.eval_split}), noise {data.noise.noise_type} requested "
                f"{cfg.noise_rate:g} realised {data.flipped.float().mean():.3f}, {cfg.model} on {device}"
            )
            trainer = Trainer(
                cfg, data, model, loss_fn, run_dir, device, logger, show_progress=progress and not quiet
            )
            history = trainer.fit(state, stop_after=stop_after)
            scores = trainer.training_set_scores()
            np.savez(
                run_dir / "scores.npz",
                index=data.train_index.numpy(),
                noisy=data.train_y.numpy(),
                clean=data.train_y_clean.numpy(),
                **{k: v.numpy() for k, v in scores.items()},
            )
            eval_scores = trainer.eval_scores()
            np.savez(run_dir / "eval_scores.npz", **eval_scores)
            summary = summarise(trainer, scores)
            if cfg.coverage is not None:
                summary["coverage_rule"], rows = trainer.coverage_rule(cfg.coverage, eval_scores)
                write_csv(run_dir / "predictions.csv", rows)
                logger.info(describe_rule(summary["coverage_rule"]))
            atomic_write_text(
                run_dir / "summary.json", json.dumps(summary, indent=1) + "\n"
            )  # read by reruns
            trainer.finish()
            logger.info(
                f"done: best {data.eval_split} acc {summary['best_eval_acc']:.2%} (epoch "
                f"{summary['best_epoch']}), last {summary['last_eval_acc']:.2%}; outputs in {run_dir}"
            )
            return RunResult(run_dir, summary, history)


def describe_rule(rule: dict) -> str:
    """Trainer.coverage_rule's summary as one log line."""
    return (
        f"abstention rule: accept when log({rule['confidence']}) >= {rule['log_threshold']:.6g} (it accepts "
        f"{rule['calibration_coverage']:.1%} of the {rule['calibration_images']} held-out calibration "
        f"images, target {rule['target_coverage']:.0%}); test: {rule['test_coverage']:.1%} accepted, "
        f"selective risk {rule['test_selective_risk']:.2%}; per image: predictions.csv"
    )


def resume_state(run_dir: Path, cfg: Config, device: torch.device) -> dict:
    """run_dir's last.pt, checked: readable, a checkpoint of this trainer, at most cfg.epochs trained."""
    try:
        state = read_checkpoint(run_dir / CHECKPOINT, CHECKPOINT_KEYS, map_location=device)
    except UserError as exc:
        raise UserError(f"--resume {run_dir}: {exc}") from None
    if state["epoch"] > cfg.epochs:
        raise UserError(
            f"epochs={cfg.epochs}: the run in {run_dir} has trained {state['epoch']} epochs "
            f"already; epochs must be >= {state['epoch']}"
        )
    return state


def resume_experiment(run_dir: str | Path, overrides=(), **kwargs) -> RunResult:
    """Continues the interrupted (or finished, to extend it) run in run_dir from its last.pt, with the
    config stored beside it. overrides: key=value strings for RESUMABLE_KEYS only; anything else would
    make the continued run a different run, and is refused."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--resume {run_dir}: not a run folder (no config.json in it)")
    for item in overrides:
        key, _ = parse_override(item)
        if key not in RESUMABLE_KEYS:
            raise UserError(
                f"--set {item}: {key} cannot change when a run resumes (only "
                f"{', '.join(RESUMABLE_KEYS)} can); start a new run with --config "
                f"{run_dir / 'config.json'} --set {item}"
            )
    from .openset.runs import OPENSET_RECORD

    if (run_dir / OPENSET_RECORD).is_file():
        raise UserError(
            f"--resume {run_dir}: an open-set run (osr, demo789); the command that started it continues "
            "its cut runs in place: run it again"
        )
    cfg = load_config(str(run_dir / "config.json"), list(overrides))
    had_lock_file = (run_dir / LOCK).exists()
    lock = lock_run_dir(run_dir)
    if lock is None:
        raise UserError(f"--resume {run_dir}: another process is training this run now")
    try:
        return run_experiment(cfg, run_dir, resume=True, **kwargs)
    except UserError:
        if not had_lock_file:  # a refused resume leaves the folder as it was
            (run_dir / LOCK).unlink(missing_ok=True)
        raise
    finally:
        unlock_run_dir(lock)
