"""Options of a large run that are not experiment hyper-parameters (those are train/config.py's Config):
where the data is, which loader, image sizes, precision of the input, validation level. Stored as
scale_options.json beside config.json in the run folder, so --resume needs nothing else.

Batch sizes in the Config are GLOBAL (the paper's 512 for WebVision): each of W ranks takes
batch_size / W, so a config means the same optimisation on any number of GPUs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .lists import MINI_WEBVISION_CLASSES
from .models import TINY
from .validate import LEVELS

OPTIONS_FILE = "scale_options.json"
LOADERS = ("auto", "dali", "torch")
DALI_DEVICES = ("auto", "cpu", "mixed")
INPUT_DTYPES = ("auto", "fp32", "fp16", "bf16")

# The smoke job (no --data_root): the paper's WebVision recipe, shrunk to a generated tree on a CPU.
SMOKE_CONFIG = {
    "description": "imagenet_scale smoke job: generated mini-WebVision tree, CPU", "dataset": "webvision",
    "model": "resnet50", "loss": "drainage", "loss_params": {"alpha": 0.1}, "l1_delta": 1e-5, "noise_type": "none",
    "optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": True, "scheduler": "step", "step_size": 1,
    "gamma": 0.97, "epochs": 2, "batch_size": 32, "eval_batch_size": 64, "grad_clip": 5.0,
}
SMOKE_OPTIONS = {"crop": 32, "resize": 36}
SMOKE_SIZES = ("epochs", "batch_size", "eval_batch_size")


@dataclass
class ScaleOptions:
    data_root: str | None = None       # dataset root; None runs the smoke job on a generated tree
    imagenet_root: str | None = None   # ILSVRC12 val for WebVision; default <data_root>/imagenet if present
    loader: str = "auto"               # auto (DALI when installed) | dali | torch
    dali_device: str = "auto"          # auto (mixed with a GPU, else cpu) | cpu | mixed
    workers: int | None = None         # DataLoader workers (0: in-process) / DALI threads per rank; None: the
                                       # rank's share of the cores (at most 16)
    crop: int = 224
    resize: int = 256                  # evaluation: shorter side resized to this, then centre crop
    input_dtype: str = "auto"          # auto (bf16 with CUDA + amp, else fp32) | fp32 | fp16 | bf16
    sync_bn: bool = False
    balanced_samples: int = 0          # Clothing1M: class-balanced draw of this many per epoch; 0: all
    check: str = "decode"              # list validation level, see train/scale/validate.py
    max_bad_fraction: float = 0.05
    arch: str | None = None            # "tiny_convnet" replaces cfg.model (tests, quick checks)
    log_interval: int = 50             # steps between throughput lines
    webvision_classes: int = MINI_WEBVISION_CLASSES

    def validate(self) -> ScaleOptions:
        checks = [
            (self.loader in LOADERS, f"loader {self.loader!r} not in {LOADERS}"),
            (self.dali_device in DALI_DEVICES, f"dali_device {self.dali_device!r} not in {DALI_DEVICES}"),
            (self.input_dtype in INPUT_DTYPES, f"input_dtype {self.input_dtype!r} not in {INPUT_DTYPES}"),
            (self.check in LEVELS, f"check {self.check!r} not in {LEVELS}"),
            (self.arch in (None, TINY), f"arch {self.arch!r} must be None or {TINY!r}"),
            (8 <= self.crop <= self.resize, f"need 8 <= crop ({self.crop}) <= resize ({self.resize})"),
            ((self.workers or 0) >= 0 and self.balanced_samples >= 0, "workers and balanced_samples must be >= 0"),
            (0 <= self.max_bad_fraction <= 1, f"max_bad_fraction {self.max_bad_fraction} not in [0, 1]"),
            (self.log_interval >= 1 and 1 <= self.webvision_classes <= 1000,
             "log_interval must be >= 1 and webvision_classes in [1, 1000]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"imagenet_scale option: {message}")
        return self

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / OPTIONS_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: Path, overrides: dict) -> ScaleOptions:
        stored = json.loads((Path(run_dir) / OPTIONS_FILE).read_text())
        return cls(**{**stored, **overrides}).validate()


OPTION_NAMES = tuple(f.name for f in fields(ScaleOptions))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.imagenet_scale",
        description="DALI-fed DDP training for mini-WebVision (+ ILSVRC12 val) and Clothing1M. Launch with "
                    "torchrun --nproc_per_node N for N GPUs. With no --data_root: a smoke job on a generated tree.")
    p.add_argument("--config", help="preset in train/configs/ (webvision_*, clothing1m_*) or a .json path")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="Config overrides, e.g. epochs=10")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from last.pt (any world size)")
    p.add_argument("--run_epochs", type=int, metavar="N", help="stop after epoch N (continue with --resume)")
    p.add_argument("--name", help="run folder name under out_dir")
    p.add_argument("--out_dir", help="parent of run folders (default: the config's, runs/)")
    p.add_argument("--quiet", action="store_true", help="no console log or progress bar")
    # ScaleOptions: default None = "not given", so --resume keeps the stored value
    p.add_argument("--data_root", help="WebVision or Clothing1M root (omit for the smoke job)")
    p.add_argument("--imagenet_root", help="ILSVRC12 root with val/ (+ devkit) for WebVision runs")
    p.add_argument("--loader", choices=LOADERS)
    p.add_argument("--dali_device", choices=DALI_DEVICES)
    p.add_argument("--workers", type=int)
    p.add_argument("--crop", type=int)
    p.add_argument("--resize", type=int)
    p.add_argument("--input_dtype", choices=INPUT_DTYPES)
    p.add_argument("--sync_bn", action="store_const", const=True)
    p.add_argument("--balanced_samples", type=int, help="Clothing1M: class-balanced samples per epoch")
    p.add_argument("--check", choices=LEVELS, help="list validation level (default decode)")
    p.add_argument("--max_bad_fraction", type=float)
    p.add_argument("--arch", choices=[TINY], help="replace the config's model (tests, quick checks)")
    p.add_argument("--log_interval", type=int)
    p.add_argument("--webvision_classes", type=int)
    return p


def given_options(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in OPTION_NAMES if getattr(args, k, None) is not None}


def resolve(args: argparse.Namespace):
    """(Config, ScaleOptions, run_dir or None, smoke) for a new run, from the flags."""
    from ..config import load_config

    options = given_options(args)
    smoke = options.get("data_root") is None
    if not smoke and not args.config:
        raise ValueError("--data_root needs --config: a webvision_* / clothing1m_* preset of train/configs/ or a "
                         ".json path (only the smoke job, without --data_root, has a built-in config)")
    base = {}
    if smoke:  # a given config keeps its recipe, shrunk to the generated tree
        base = SMOKE_CONFIG if not args.config else {k: SMOKE_CONFIG[k] for k in SMOKE_SIZES}
        options = {**SMOKE_OPTIONS, **options}
    runtime = {k: getattr(args, k) for k in ("name", "out_dir") if getattr(args, k)}
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**base, **runtime}.items()] + list(args.set)
    cfg = load_config(args.config, overrides)
    if smoke and cfg.dataset != "webvision":
        raise ValueError(f"the smoke job (no --data_root) runs on a generated WebVision tree; config dataset is "
                         f"{cfg.dataset!r}: give --data_root")
    return cfg, ScaleOptions(**options).validate(), smoke
