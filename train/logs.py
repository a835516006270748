"""Run outputs that are written as training goes: a readable log, JSONL metrics, optional TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path


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


class MetricsLog:
    """One JSON object per evaluated epoch in metrics.jsonl; the same scalars to TensorBoard with tb=True."""

    def __init__(self, run_dir: Path, tb: bool = False, history: list[dict] | None = None):
        self.path = run_dir / "metrics.jsonl"
        # rewritten from the checkpoint's history on resume, so the file never holds an epoch the
        # checkpoint does not (a crash between the two writes)
        self.path.write_text("".join(self._line(row) for row in history or []))
        self.writer = None
        if tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("tb=true needs TensorBoard: pip install -e '.[tb]'") from exc
            self.writer = SummaryWriter(str(run_dir / "tb"))

    @staticmethod
    def _line(row: dict) -> str:
        return json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n"

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(self._line(row))
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch" and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
