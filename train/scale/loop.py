"""The training loop of a large run: ScaleTrainer(cfg, options, ctx, run_dir, log, spec).fit().

A step: batch -> device input (bf16 / fp16 / fp32, channels_last on CUDA) -> forward (fp32; bf16
autocast with amp=true on CUDA) through DDP -> loss (drainage_fast's fused kernels for drainage, gamblers
and dac configs; + l1_delta * sum|theta|) -> backward (DDP averages gradients: with equal per-rank
batches the loss is the global-batch mean) -> clip the global gradient norm -> step. The learning rate
steps once per epoch; before an epoch, the loss's schedule moves to it (Deep Gamblers' pre-training,
DAC's warm-up and alpha ramp: train/losses.py). DAC's batch statistic is averaged over the ranks, so
every rank ramps the same alpha.

Metrics are all-reduced as sums and counts. Evaluation runs on the unwrapped model (no DDP collectives
per batch) after averaging BatchNorm statistics over ranks. Rank 0 logs images/s and the fraction of
time spent waiting for data, shows the progress bar and writes the atomic checkpoint; every rank loads
it on --resume. The checkpoint holds only global state (epoch, model, optimizer, scheduler, the loss's
schedule, metric history and rank 0's RNG); the data order of epoch e depends on (seed, e) alone, so a
run resumes at the next epoch on any world size.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import atomic_save, capture_rng_state, restore_rng_state
from ..losses import DeepAbstainingClassifier, build_loss, is_abstaining, phase_text
from ..trainer import LOSS_SCHEDULE, build_optimizer, build_scheduler, class_predictions, optimisation_step
from . import data as scale_data
from .distributed import DistContext, all_reduce_sum, average_batchnorm_statistics
from .lists import DatasetSpec
from .models import build_scale_model, prepare_for_training

CHECKPOINT, BEST = "last.pt", "best.pt"


class ScaleTrainer:
    def __init__(
        self,
        cfg,
        options,
        ctx: DistContext,
        run_dir: Path,
        log,
        spec: DatasetSpec,
        show_progress: bool = True,
    ):
        """spec: the validated lists (train/scale/data.py load_lists)."""
        self.cfg, self.options, self.ctx, self.run_dir, self.log = cfg, options, ctx, Path(run_dir), log
        self.spec = spec
        self.C = self.spec.num_classes
        self.loaders = scale_data.build_loaders(self.spec, cfg, options, ctx)
        self.amp = cfg.amp and ctx.device.type == "cuda"
        model = build_scale_model(cfg, options.arch, self.C, ctx)
        self.model, self.train_model = prepare_for_training(
            model,
            ctx,
            sync_bn=options.sync_bn,
            channels_last=self.loaders.channels_last,
            compile_model=cfg.compile,
        )
        self.loss_fn = build_loss(cfg.loss, self.C, **cfg.loss_params)
        if isinstance(self.loss_fn, DeepAbstainingClassifier) and ctx.distributed:
            self.loss_fn.reduce_mean = lambda value: all_reduce_sum(value, ctx) / ctx.world_size
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.abstaining = is_abstaining(cfg.loss)
        self.show_progress = show_progress and ctx.is_main and sys.stderr.isatty()
        self.epoch, self.history, self.best = 0, [], {"epoch": 0, f"{self.spec.select}_top1": -1.0}

    # ------------------------------------------------------------------------------------ training
    def _step(self, images, labels) -> torch.Tensor:
        """One optimisation step; returns (loss * n, correct) on the device (no host synchronisation)."""
        cfg = self.cfg
        x = scale_data.to_model_input(images, self.loaders)
        y = labels.to(self.ctx.device, non_blocking=True)
        with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.train_model(x)
        loss = self.loss_fn(logits, y)
        optimisation_step(cfg, loss, self.model, self.optimizer)
        correct = (class_predictions(logits.detach(), self.C) == y).sum()
        return torch.stack([loss.detach().float() * len(y), correct.float()])

    def train_epoch(self) -> dict:
        from tqdm import tqdm

        self.train_model.train()
        if self.abstaining:
            self.loss_fn.start_epoch(self.epoch + 1, self.cfg.epochs)
        indices = scale_data.epoch_indices(self.spec, self.options, self.cfg.seed, self.epoch)
        batches = self.loaders.train.epoch(self.epoch, indices)
        sums, seen = torch.zeros(2, dtype=torch.float64, device=self.ctx.device), 0
        bar = tqdm(
            total=len(batches),
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            unit="step",
            leave=False,
            disable=not self.show_progress,
        )
        wait, start = 0.0, time.perf_counter()
        interval_start, interval_wait = start, 0.0
        fetch = time.perf_counter()
        for steps, (images, labels) in enumerate(batches, start=1):
            waited = time.perf_counter() - fetch
            wait, interval_wait = wait + waited, interval_wait + waited
            sums += self._step(images, labels)
            seen += len(labels)
            bar.update(1)
            if steps % self.options.log_interval == 0 and self.ctx.is_main:
                elapsed = time.perf_counter() - interval_start
                rate = self.options.log_interval * len(labels) * self.ctx.world_size / elapsed
                bar.set_postfix(img_s=f"{rate:.0f}", wait=f"{interval_wait / elapsed:.0%}")
                self.log.info(
                    f"  step {steps}/{len(batches)} | {rate:.0f} img/s "
                    f"| data wait {interval_wait / elapsed:.0%}"
                )
                interval_start, interval_wait = time.perf_counter(), 0.0
            fetch = time.perf_counter()
        bar.close()
        self._report_bad_files(self.spec.train, batches.bad_files, "replaced by other training images")
        totals = all_reduce_sum(torch.cat([sums, sums.new_tensor([seen, len(batches.bad_files)])]), self.ctx)
        loss_sum, correct, seen, bad = totals.tolist()
        seconds = time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc_noisy": correct / max(seen, 1),
            "train_images": int(seen),
            "train_bad_files": int(bad),
            "images_per_s": seen / seconds,
            "data_wait_frac": wait / seconds,
            **(self.loss_fn.phase() if self.abstaining else {}),
        }

    def _report_bad_files(self, images, bad: list[int], what: str, examples: int = 3) -> None:
        """Names this rank's undecodable files in the log (the epoch row holds the count over all ranks)."""
        if bad:
            names = ", ".join(images.paths[i] for i in bad[:examples]) + (
                " ..." if len(bad) > examples else ""
            )
            self.log.warning(f"  {images.name}: {len(bad)} file(s) could not be decoded, {what}: {names}")

    # ------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 / top-5 over the C classes (drainage excluded) and the drained fraction, per list."""
        self.model.eval()
        average_batchnorm_statistics(self.model, self.ctx)
        row = {}
        for name, loader in self.loaders.evals.items():
            counts, n = torch.zeros(3, dtype=torch.float64, device=self.ctx.device), 0  # top1, top5, drained
            for images, labels in loader:
                y = labels.to(self.ctx.device, non_blocking=True)
                with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = self.model(scale_data.to_model_input(images, self.loaders)).float()
                top = logits[:, : self.C].topk(min(5, self.C), dim=1).indices
                counts += torch.stack(
                    [
                        (top[:, 0] == y).sum(),
                        (top == y[:, None]).any(1).sum(),
                        (logits.argmax(1) == self.C).sum(),
                    ]
                ).double()
                n += len(y)
            self._report_bad_files(self.spec.evals[name], loader.bad_files, "left out of the evaluation")
            totals = all_reduce_sum(
                torch.cat([counts, counts.new_tensor([n, len(loader.bad_files)])]), self.ctx
            )
            top1, top5, drained, n, bad = totals.tolist()
            row.update(
                {f"{name}_top1": top1 / max(n, 1), f"{name}_top5": top5 / max(n, 1), f"{name}_n": int(n)}
            )
            if bad:
                row[f"{name}_bad_files"] = int(bad)
            if self.abstaining:
                row[f"{name}_drained_frac"] = drained / max(n, 1)
        return row

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        if not self.ctx.is_main:
            return
        atomic_save(
            {
                "epoch": self.epoch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng_state(),
                "history": self.history,
                "best": self.best,
                "config": asdict(self.cfg),
                LOSS_SCHEDULE: self.loss_fn.schedule_state() if self.abstaining else {},
                "options": asdict(self.options),
                "world_size": self.ctx.world_size,
            },
            self.run_dir / CHECKPOINT,
        )

    def restore(self, state: dict) -> None:
        """Continues from a checkpoint read by train/scale/start.py read_resume_checkpoint (on the CPU:
        the load_state_dict calls copy to the device)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # CPU generators only: per-device CUDA states do not carry over to another GPU count
        restore_rng_state({**state["rng"], "cuda": []})
        if self.abstaining:
            self.loss_fn.load_schedule_state(state[LOSS_SCHEDULE])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        self.log.info(
            f"resumed from {self.run_dir / CHECKPOINT} after epoch {self.epoch} "
            f"(saved by {state['world_size']} process(es), now {self.ctx.world_size})"
        )

    # ------------------------------------------------------------------------------------ the loop
    def fit(self, metrics, stop_after: int | None = None) -> list[dict]:
        """Trains from self.epoch to cfg.epochs (or to epoch stop_after); `metrics`: a MetricsLog on
        rank 0, None elsewhere."""
        cfg = self.cfg
        last = min(cfg.epochs, stop_after or cfg.epochs)
        self.log.info(
            f"{cfg.dataset}: {len(self.spec.train)} training images, "
            + ", ".join(f"{n} {len(v)}" for n, v in self.spec.evals.items())
            + f" | {self.loaders.kind} loader, {self.ctx.world_size} process(es) on {self.ctx.device}, "
            f"global batch {cfg.batch_size}, input {str(self.loaders.dtype).replace('torch.', '')}"
        )
        while self.epoch < last:
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            self.epoch += 1
            if self.epoch % cfg.eval_freq == 0 or self.epoch in (1, cfg.epochs):
                row.update(self.evaluate())
                self._track_best(row)
            self.history.append(row)
            self.save_checkpoint()
            if metrics is not None:
                metrics.write(row)
            self.log.info(format_row(row, cfg.epochs, self.spec.select))
        return self.history

    def _track_best(self, row: dict) -> None:
        key = f"{self.spec.select}_top1"
        if row[key] > self.best[key]:
            self.best = {
                "epoch": row["epoch"],
                **{k: v for k, v in row.items() if k.endswith(("_top1", "_top5"))},
            }
            if self.ctx.is_main:
                atomic_save(
                    {"epoch": row["epoch"], "model": self.model.state_dict(), "config": asdict(self.cfg)},
                    self.run_dir / BEST,
                )

    def reported(self) -> dict:
        """The result: top-1 of the reported split at the last evaluated epoch (the official metric: the
        Drainage code tests Clothing1M once, after its last epoch, main.py) and, second, at the epoch
        selected on the selection split."""
        split = self.spec.report or self.spec.select
        key = f"{split}_top1"
        evaluated = [row for row in self.history if key in row]
        last = evaluated[-1] if evaluated else {}
        return {
            "split": split,
            "last_epoch": last.get("epoch"),
            "top1_last_epoch": last.get(key),
            "selected_on": self.spec.select,
            "best_val_epoch": self.best["epoch"],
            "top1_best_val_epoch": self.best.get(key),
        }

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {
            "dataset": self.cfg.dataset,
            "reported": self.reported(),
            "selected_on": self.spec.select,
            "best": self.best,
            "last": {k: v for k, v in last.items() if k.endswith(("_top1", "_top5"))},
            "epochs": self.epoch,
            "world_size": self.ctx.world_size,
            "loader": self.loaders.kind,
            "mean_images_per_s": sum(r["images_per_s"] for r in self.history) / max(len(self.history), 1),
        }


def format_row(row: dict, epochs: int, select: str) -> str:
    parts = [
        f"epoch {row['epoch']:>3}/{epochs}",
        f"loss {row['train_loss']:.4f}",
        f"train acc {row['train_acc_noisy']:.2%}",
    ]
    for key in sorted(k for k in row if k.endswith("_top1")):
        name = key[: -len("_top1")]
        mark = "*" if name == select else ""
        parts.append(f"{name}{mark} {row[key]:.2%} (top5 {row[name + '_top5']:.2%})")
    if phase_text(row):  # Deep Gamblers' pre-training, DAC's warm-up and alpha
        parts.append(phase_text(row))
    parts.append(f"{row['images_per_s']:.0f} img/s, data wait {row['data_wait_frac']:.0%}")
    parts.append(f"lr {row['lr']:.4g}")
    return " | ".join(parts)


def write_summary(trainer: ScaleTrainer, run_dir: Path) -> dict:
    summary = trainer.summary()
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
