"""The training loop: Trainer(cfg, data, model, loss, run_dir).fit(), per-epoch atomic checkpoints and an
exact resume, evaluation by argmax over the C class logits, selective classification (AURC, the risk at
a coverage) and abstain-probability (p_d) statistics.

An epoch, one named method a step: _start_epoch (the loss's schedule moves to the epoch: Deep Gamblers'
pre-training, DAC's warm-up and alpha ramp; the seeded batch order) -> _train_step per batch (augment,
CPU-seeded -> forward, fp32; bf16 autocast with amp=true on CUDA -> loss (+ l1_delta * sum|theta|) ->
backward -> clip the global gradient norm -> step) -> _end_epoch (the learning rate steps, once per
epoch) -> _evaluation_row (evaluate, training-set statistics, the best epoch) -> _log_row ->
save_checkpoint.
Resuming restores model, optimizer, scheduler, the loss's schedule, every RNG and the metric history, so
2 epochs + resume + 1 epoch gives the same weights as 3 epochs straight (tested bit for bit on the
CPU). last.pt is written
before the first epoch and after every epoch, whatever cfg.checkpoint says, so that any run cut by
Ctrl-C or a crash can be continued; cfg.checkpoint=false only drops it once the run's outputs are
complete (finish()). best.pt holds the weights of the best evaluated epoch (atomic, like last.pt;
cfg.checkpoint=true only).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from drainage_fast.openset import (
    drainage_probability,
    precision_at_k,
    selective_confidences,
    selective_metrics,
    selective_threshold,
)

from .checkpoint import atomic_save, capture_rng_state, restore_rng_state
from .data import NoisyDataset, prepare_batch
from .logs import MetricsLog
from .losses import Abstaining, l1_penalty, num_outputs, phase_text
from .run_dirs import Interrupted, UserError

CHECKPOINT, BEST = "last.pt", "best.pt"
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "history", "best")
LOSS_SCHEDULE = "loss_schedule"  # the checkpoint's key for Abstaining.schedule_state()
# the per-batch bar appears only on epochs that run longer than this (a digits epoch takes 0.1 s)
BATCH_BAR_DELAY_S = 2.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda when there is a GPU, else cpu. A device this machine does not have is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine; use device=cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"device={name}: this machine has {torch.cuda.device_count()} GPU(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def class_predictions(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K) -> (N,): argmax over the C class logits (the drainage node never is a prediction)."""
    return logits[:, :num_classes].argmax(dim=1)


def own_confidence(abstaining: bool) -> str:
    """The confidence a model abstains by (drainage_fast.openset.selective_confidences): 1 - p_d with an
    abstain output, else the maximum softmax probability."""
    return "1-p_d" if abstaining else "msp"


def evaluation_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, abstaining: bool
) -> dict:
    """Clean accuracy of (N, K) logits against labels; with an abstain output, the share whose argmax
    over all K outputs is that output (eval_drained_frac); and for each confidence (1 - p_d with an
    abstain output, the MSP always) AURC, E-AURC and the selective risk at REPORTED_COVERAGES, keyed
    eval_aurc[<confidence>], eval_e_aurc[...], eval_risk@90[...]."""
    correct = class_predictions(logits, num_classes) == labels
    row = {"eval_acc": correct.float().mean().item()}
    if abstaining:
        row["eval_drained_frac"] = (logits.argmax(1) == num_classes).float().mean().item()
    for score, confidence in selective_confidences(logits, -1 if abstaining else None).items():
        for name, value in selective_metrics(confidence, correct).items():
            row[f"eval_{name.lower().replace('-', '_')}[{score}]"] = value
    return row


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or Adam, as cfg says; shared with train/scale/loop.py."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


def build_scheduler(cfg, optimizer):
    """Cosine to eta_min over cfg.epochs, StepLR(step_size, gamma), or constant; stepped per epoch."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.eta_min)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def optimisation_step(cfg, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """loss (+ l1_delta * sum |theta| when l1_delta > 0) -> backward -> clip the global gradient norm
    to cfg.grad_clip (0: no clipping) -> step. Shared with train/scale/loop.py."""
    objective = loss + cfg.l1_delta * l1_penalty(model) if cfg.l1_delta > 0 else loss
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()


class Trainer:
    """Trains `model` on `data` with `loss_fn` as cfg says; writes checkpoints and metrics to run_dir."""

    def __init__(
        self,
        cfg,
        data: NoisyDataset,
        model: nn.Module,
        loss_fn: nn.Module,
        run_dir: Path,
        device: torch.device,
        logger,
        show_progress: bool = True,
    ):
        self.cfg, self.data, self.loss_fn, self.run_dir, self.device, self.log = (
            cfg,
            data,
            loss_fn,
            Path(run_dir),
            device,
            logger,
        )
        self.C = data.num_classes
        self.abstaining = num_outputs(cfg.loss, self.C) > self.C  # the abstain (drainage) output
        self.schedule = loss_fn if isinstance(loss_fn, Abstaining) else None
        self.amp = cfg.amp and device.type == "cuda"
        self.memory_format = (
            torch.channels_last
            if cfg.channels_last and device.type == "cuda" and data.train_x.dim() == 4
            else torch.contiguous_format
        )
        self.raw_model = model.to(device, memory_format=self.memory_format)
        self.model = torch.compile(model) if cfg.compile else model
        self.optimizer = build_optimizer(cfg, self.raw_model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # batch order and augmentation
        self.show_progress = show_progress and sys.stderr.isatty()
        self.train_x, self.train_y = data.train_x.to(device), data.train_y.to(device)
        self.eval_x, self.eval_y = data.eval_x.to(device), data.eval_y.to(device)
        self.epoch, self.history, self.best = 0, [], {"eval_acc": -1.0, "epoch": 0}
        self.saved_epoch = None  # the epoch last.pt holds (None: not written yet)

    # ---------------------------------------------------------------- inputs and forward passes
    def _inputs(self, raw: torch.Tensor, augment: bool) -> torch.Tensor:
        d = self.data
        x = prepare_batch(
            raw,
            pixel_scale=d.pixel_scale,
            mean=d.mean,
            std=d.std,
            augment=d.augment,
            gen=self.gen if augment else None,
        )
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    @torch.no_grad()
    def logits(self, raw_x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits (N, K) float32 for raw images, in batches of eval_batch_size."""
        self.model.eval()
        out = []
        for chunk in raw_x.split(self.cfg.eval_batch_size):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out.append(self.model(self._inputs(chunk, augment=False)).float())
        return torch.cat(out) if out else torch.empty(0, num_outputs(self.cfg.loss, self.C))

    # ---------------------------------------------------------------- one epoch
    def train_epoch(self) -> dict:
        """One pass over the training set: _start_epoch, a _train_step per batch, _end_epoch."""
        batches = self._start_epoch()
        sums = {"loss": torch.zeros((), device=self.device), "correct": torch.zeros((), device=self.device)}
        seen = 0
        bar = self._progress_bar(
            total=len(batches), desc=f"epoch {self.epoch + 1}", unit="batch", delay=BATCH_BAR_DELAY_S
        )
        for idx in batches:
            bar.update(1)
            if len(idx) < 2:  # BatchNorm cannot train on one sample; happens only for N = 1 mod batch
                continue
            self._train_step(idx.to(self.device), sums)
            seen += len(idx)
        bar.close()
        return self._end_epoch(sums, seen)

    def _start_epoch(self) -> tuple[torch.Tensor, ...]:
        """The loss's schedule moves to the epoch about to train; returns its batches (a seeded order)."""
        self.model.train()
        if self.schedule is not None:
            self.schedule.start_epoch(self.epoch + 1, self.cfg.epochs)
        return torch.randperm(len(self.train_y), generator=self.gen).split(self.cfg.batch_size)

    def _train_step(self, idx: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
        """One optimisation step on the training samples idx; adds its loss * n and correct count to
        sums (on the device: no host synchronisation)."""
        x, y = self._inputs(self.train_x[idx], augment=True), self.train_y[idx]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x)
        loss = self.loss_fn(logits, y)
        optimisation_step(self.cfg, loss, self.raw_model, self.optimizer)
        sums["loss"] += loss.detach() * len(idx)
        sums["correct"] += (class_predictions(logits.detach(), self.C) == y).sum()

    def _end_epoch(self, sums: dict[str, torch.Tensor], seen: int) -> dict:
        """The learning rate steps; returns the epoch's training row (with the loss's phase)."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        seen = max(seen, 1)
        row = {
            "lr": lr,
            "train_loss": sums["loss"].item() / seen,
            "train_acc_noisy": sums["correct"].item() / seen,
        }
        return row | (self.schedule.phase() if self.schedule is not None else {})

    def evaluate(self) -> dict:
        """evaluation_metrics on the evaluation split (the test set, or the validation split)."""
        return evaluation_metrics(self.logits(self.eval_x), self.eval_y, self.C, self.abstaining)

    def eval_scores(self) -> dict[str, np.ndarray]:
        """Per evaluation image: label, pred (over the C classes), correct, drained (argmax over all K is
        the abstain output; abstaining models) and each confidence as confidence[<name>] (the natural
        logarithms of selective_confidences): what every selective metric recomputes from (the run
        folder's eval_scores.npz)."""
        logits = self.logits(self.eval_x).cpu()
        pred = class_predictions(logits, self.C)
        out = {
            "label": self.data.eval_y.numpy(),
            "pred": pred.numpy(),
            "correct": (pred == self.data.eval_y).numpy(),
        }
        if self.abstaining:
            out["drained"] = (logits.argmax(1) == self.C).numpy()
        confidences = selective_confidences(logits, -1 if self.abstaining else None)
        return out | {f"confidence[{k}]": v.numpy() for k, v in confidences.items()}

    def coverage_rule(self, coverage: float, scores: dict[str, np.ndarray]) -> tuple[dict, list[dict]]:
        """The rule a deployed model abstains by: the threshold of its own confidence (own_confidence, as
        its logarithm: log(1 - p_d) or log(MSP)) that accepts `coverage` of the calibration images (held
        out of training, data.calib_x; labels not needed), applied to every test image (a run with a
        coverage evaluates on the test set; scores: their eval_scores()). Returns (what the rule did: the
        log threshold, coverage on both splits, the test share abstained and selective risk; one row per
        test image: index, label, pred, log_confidence, abstain, correct)."""
        score = own_confidence(self.abstaining)
        calib_logits = self.logits(self.data.calib_x).cpu()
        calib = selective_confidences(calib_logits, -1 if self.abstaining else None)[score]
        threshold = selective_threshold(calib, coverage)
        confidence = scores[f"confidence[{score}]"]
        accepted = confidence >= threshold
        correct = scores["correct"]
        summary = {
            "target_coverage": coverage,
            "confidence": score,
            "log_threshold": threshold,
            "calibration_images": len(calib),
            "calibration_coverage": float((calib >= threshold).double().mean()),
            "test_coverage": float(accepted.mean()),
            "test_abstained": float(1 - accepted.mean()),
            "test_selective_risk": float(1 - correct[accepted].mean()) if accepted.any() else math.nan,
        }
        rows = [
            {
                "index": i,
                "label": int(scores["label"][i]),
                "pred": int(scores["pred"][i]),
                "log_confidence": float(confidence[i]),
                "abstain": int(not accepted[i]),
                "correct": int(correct[i]),
            }
            for i in range(len(confidence))
        ]
        return summary, rows

    def training_set_scores(self) -> dict[str, torch.Tensor]:
        """Per training sample (eval mode, no augmentation): predicted class, the closed-softmax
        probability of the given (noisy) label, and p_d for a drainage model. CPU tensors."""
        logits = self.logits(self.train_x).cpu()
        y = self.data.train_y
        scores = {
            "pred": class_predictions(logits, self.C),
            "p_given": logits[:, : self.C].softmax(1).gather(1, y[:, None])[:, 0],
        }
        if self.abstaining:
            scores["p_drain"] = drainage_probability(logits)
        return scores

    def training_set_stats(self, scores: dict | None = None) -> dict:
        """How the model treats clean vs flipped training samples: memorisation, p_d, detection."""
        s = scores or self.training_set_scores()
        flipped, y = self.data.flipped, self.data.train_y
        row = {
            "train_acc_clean": (s["pred"] == self.data.train_y_clean).float().mean().item(),
            "memorized_frac": (s["pred"] == y)[flipped].float().mean().item() if flipped.any() else math.nan,
            "precision_at_k_self_conf": precision_at_k(1 - s["p_given"], flipped),
        }
        if self.abstaining:
            p = s["p_drain"]
            row["pd_clean"] = p[~flipped].mean().item() if (~flipped).any() else math.nan
            row["pd_flipped"] = p[flipped].mean().item() if flipped.any() else math.nan
            row["precision_at_k_pd"] = precision_at_k(p, flipped)
        return row

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        atomic_save(
            {
                "epoch": self.epoch,
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng_state(self.gen),
                "history": self.history,
                "best": self.best,
                "config": asdict(self.cfg),
                LOSS_SCHEDULE: self.schedule.schedule_state() if self.schedule is not None else {},
            },
            self.run_dir / CHECKPOINT,
        )
        self.saved_epoch = self.epoch

    def save_best(self) -> None:
        atomic_save(
            {
                "epoch": self.epoch,
                "eval_acc": self.best["eval_acc"],
                "eval_split": self.data.eval_split,
                "model": self.raw_model.state_dict(),
                "config": asdict(self.cfg),
            },
            self.run_dir / BEST,
        )

    def load_state(self, state: dict) -> None:
        """Continues from a checkpoint's state (checkpoint.read_checkpoint(run_dir / CHECKPOINT)).

        When cfg.epochs differs from the checkpoint's (a resume that extends or shortens the run), a
        cosine schedule continues as if it had been planned for cfg.epochs from the start: the learning
        rate of the next epoch is the closed form at this epoch over the new length (timm's rule).
        """
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"], self.gen)
        if self.schedule is not None:
            self.schedule.load_schedule_state(state[LOSS_SCHEDULE])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        self.saved_epoch = self.epoch
        cosine = isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
        if cosine and self.scheduler.T_max != self.cfg.epochs:
            eta_min, self.scheduler.T_max = self.scheduler.eta_min, self.cfg.epochs
            # CosineAnnealingLR steps recursively from the current lr, so setting it here puts every later
            # epoch on the new curve
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                factor = (1 + math.cos(math.pi * self.epoch / self.cfg.epochs)) / 2
                group["lr"] = eta_min + (base - eta_min) * factor

    def finish(self) -> None:
        """Called once the run's outputs are all written: a finished run keeps last.pt only when
        cfg.checkpoint asks for it (a sweep's runs do not: they are never continued once finished)."""
        if not self.cfg.checkpoint and self.epoch == self.cfg.epochs:
            (self.run_dir / CHECKPOINT).unlink(missing_ok=True)

    def _progress_bar(self, **kwargs):
        from tqdm import tqdm

        return tqdm(disable=not self.show_progress, leave=False, dynamic_ncols=True, **kwargs)

    # ---------------------------------------------------------------- the loop
    def fit(self, state: dict | None = None, stop_after: int | None = None) -> list[dict]:
        """Trains to cfg.epochs (or until epoch `stop_after`, for chunked jobs); returns the history.

        state: a checkpoint to continue from (see load_state). Ctrl-C leaves the last completed epoch's
        checkpoint (epoch 0's before the first ends) and raises Interrupted saying what it holds.
        """
        cfg = self.cfg
        if state is not None:
            self.load_state(state)
            self.log.info(
                f"resumed from {self.run_dir / CHECKPOINT} after epoch {self.epoch} of {cfg.epochs}"
            )
        else:
            self.save_checkpoint()  # a run cut in its first epoch continues from here
        metrics = MetricsLog(self.run_dir, tb=cfg.tb, history=self.history)
        last = min(cfg.epochs, stop_after or cfg.epochs)
        bar = self._progress_bar(
            total=cfg.epochs, initial=self.epoch, desc=f"{cfg.loss} on {cfg.dataset}", unit="epoch"
        )
        start = time.perf_counter()
        try:
            while self.epoch < last:
                row = self._run_epoch(start)
                if row is not None:
                    metrics.write(row)
                    bar.set_postfix(acc=f"{row['eval_acc']:.3f}", loss=f"{row['train_loss']:.3f}")
                bar.update(1)
        except KeyboardInterrupt:
            if self.saved_epoch is None:  # nothing to continue from: the caller says what became of it
                raise
            raise Interrupted(
                f"interrupted; {self.run_dir / CHECKPOINT} holds epoch {self.saved_epoch} of {cfg.epochs}"
            ) from None
        finally:
            bar.close()
            metrics.close()
        return self.history

    def _run_epoch(self, start: float) -> dict | None:
        """Trains an epoch; evaluates it when eval_freq says so (then returns its row, else None); writes
        the checkpoint."""
        t0 = time.perf_counter()
        row = self.train_epoch()
        self.epoch += 1
        evaluated = self.epoch % self.cfg.eval_freq == 0 or self.epoch in (1, self.cfg.epochs)
        if evaluated:
            row = self._evaluation_row(row, t0, start)
            self._log_row(row)
        self.save_checkpoint()
        return row if evaluated else None

    def _evaluation_row(self, row: dict, t0: float, start: float) -> dict:
        """The epoch's training row with its evaluation, training-set statistics, the best epoch so far
        (best.pt written when it is this one) and timings; appended to the history."""
        row = {"epoch": self.epoch, **row, **self.evaluate(), "eval_split": self.data.eval_split}
        if self.cfg.train_stats:
            row.update(self.training_set_stats())
        if row["eval_acc"] > self.best["eval_acc"]:
            self.best = {"eval_acc": row["eval_acc"], "epoch": self.epoch}
            if self.cfg.checkpoint:
                self.save_best()
        row.update(
            best_eval_acc=self.best["eval_acc"],
            best_epoch=self.best["epoch"],
            epoch_s=time.perf_counter() - t0,
            elapsed_s=time.perf_counter() - start,
        )
        self.history.append(row)
        return row

    def _log_row(self, row: dict) -> None:
        """Every evaluation goes to train.log; the console gets about ten of them per run."""
        every = max(1, self.cfg.epochs // 10)
        shown = self.epoch % every == 0 or self.epoch in (1, self.cfg.epochs)
        self.log.info(format_row(row, self.cfg.epochs), extra={"console": shown})


def format_row(row: dict, epochs: int) -> str:
    parts = [
        f"epoch {row['epoch']:>3}/{epochs}",
        f"loss {row['train_loss']:.4f}",
        (
            f"{row['eval_split']} acc {row['eval_acc']:.2%} "
            f"(best {row['best_eval_acc']:.2%} @{row['best_epoch']})"
        ),
    ]
    score = own_confidence("eval_drained_frac" in row)
    parts.append(f"AURC[{score}] {row[f'eval_aurc[{score}]']:.4f}")
    if "pd_clean" in row:
        parts.append(f"p_d clean {row['pd_clean']:.3f} flipped {row['pd_flipped']:.3f}")
    if "eval_drained_frac" in row:
        parts.append(f"abstained {row['eval_drained_frac']:.1%}")
    if phase_text(row):
        parts.append(phase_text(row))
    if "memorized_frac" in row:
        parts.append(f"memorized {row['memorized_frac']:.1%}")
    parts.append(f"lr {row['lr']:.4g} | {row['epoch_s']:.2f}s")
    return " | ".join(parts)
