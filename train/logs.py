"""Run outputs that are written as training goes: a readable log, the metrics (JSONL, CSV), optional
TensorBoard.

One row per evaluated epoch goes to metrics.jsonl (appended) and metrics.csv (rewritten whole, atomically:
a row may add a column); with tb, the same scalars go to TensorBoard, grouped train/... (the optimiser,
training batches and training-set statistics), eval/... (the evaluation splits) and time/...
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from pathlib import Path

from .run_dirs import UserError, atomic_write_text

# row keys that describe training, not the evaluation split: TensorBoard group train/ (the rest: eval/)
TRAIN_KEYS = ("lr", "train_", "pd_", "precision_at_k", "memorized", "images_per_s", "data_wait")
TIME_KEYS = ("epoch_s", "elapsed_s")


class _TqdmConsole(logging.Handler):
    """Prints through tqdm.write so log lines do not break a progress bar; records logged with
    extra={"console": False} go to the file only."""

    def emit(self, record):
        if not getattr(record, "console", True):
            return
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def run_logger(run_dir: Path, quiet: bool = False) -> logging.Logger:
    """A logger writing to run_dir/train.log and, unless quiet, to the console."""
    logger = logging.getLogger(f"train.run.{run_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    close_logger(logger)
    file = logging.FileHandler(run_dir / "train.log")
    file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(file)
    if not quiet:
        console = _TqdmConsole()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def tensorboard_tag(key: str) -> str:
    """A metrics row key -> its TensorBoard tag: train/loss, eval/acc, eval/best_acc, time/epoch_s, ..."""
    if key in TIME_KEYS:
        return f"time/{key}"
    if key.startswith(TRAIN_KEYS):
        return f"train/{key.removeprefix('train_')}"
    return f"eval/{key.removeprefix('eval_').replace('best_eval_', 'best_')}"


def tensorboard_writer_class():
    """torch's SummaryWriter; a UserError when TensorBoard is not installed (checked before a run starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("tb=true needs TensorBoard: pip install -e '.[tb]' (or leave out --tb)") from None
    return SummaryWriter


class MetricsLog:
    """One row per evaluated epoch in metrics.jsonl and metrics.csv; the same scalars to TensorBoard with
    tb=True."""

    def __init__(self, run_dir: Path, tb: bool = False, history: list[dict] | None = None):
        self.path, self.csv_path = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self.rows = list(history or [])
        # rewritten from the checkpoint's history on resume, so the files never hold an epoch the
        # checkpoint does not (a crash between the two writes)
        self.path.write_text("".join(self._line(row) for row in self.rows))
        self._write_csv()
        self.writer = tensorboard_writer_class()(str(run_dir / "tb")) if tb else None

    @staticmethod
    def _line(row: dict) -> str:
        return json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n"

    def _write_csv(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in self.rows for k in row)))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, text.getvalue())

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(self._line(row))
        self.rows.append(row)
        self._write_csv()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch" and math.isfinite(value):
                    self.writer.add_scalar(tensorboard_tag(key), value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
