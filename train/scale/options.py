"""Options of a large run that are not experiment hyper-parameters (those are train/config.py's Config):
where the data is, which loader, image sizes, precision of the input, validation level. Stored as
scale_options.json beside config.json in the run folder, so --resume needs nothing else.

Batch sizes in the Config are GLOBAL (the paper's 512 for WebVision): each of W ranks takes
batch_size / W, so a config means the same optimisation on any number of GPUs.

Every mistake in the flags is a UserError (one line naming the flag, the value and what is accepted,
exit status 2), raised before anything is created.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..arguments import several
from ..config import CONFIG_DIR, load_config, resolve_config_path
from ..run_dirs import UserError, atomic_write_text
from .lists import MINI_WEBVISION_CLASSES
from .models import TINY
from .validate import LEVELS

OPTIONS_FILE = "scale_options.json"
LOADERS = ("auto", "dali", "torch")
DALI_DEVICES = ("auto", "cpu", "mixed")
INPUT_DTYPES = ("auto", "fp32", "fp16", "bf16")
DATASETS = ("webvision", "clothing1m")
PRESETS = tuple(
    sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p.stem.startswith(tuple(f"{d}_" for d in DATASETS)))
)

# The smoke job (no --data_root): the paper's WebVision recipe, shrunk to a generated tree on a CPU.
SMOKE_CONFIG = {
    "description": "imagenet_scale smoke job: generated mini-WebVision tree, CPU",
    "dataset": "webvision",
    "model": "resnet50",
    "loss": "drainage",
    "loss_params": {"alpha": 0.1},
    "l1_delta": 1e-5,
    "noise_type": "none",
    "optimizer": "sgd",
    "lr": 0.02,
    "momentum": 0.9,
    "nesterov": True,
    "scheduler": "step",
    "step_size": 1,
    "gamma": 0.97,
    "epochs": 2,
    "batch_size": 32,
    "eval_batch_size": 64,
    "grad_clip": 5.0,
}
SMOKE_OPTIONS = {"crop": 32, "resize": 36}
SMOKE_SIZES = ("epochs", "batch_size", "eval_batch_size")

# What --resume may change: where the data is and how it is read, never what is trained on or how.
RESUMABLE_OPTIONS = (
    "data_root",
    "imagenet_root",
    "loader",
    "dali_device",
    "workers",
    "check",
    "max_bad_fraction",
    "log_interval",
)
RESUMABLE_CONFIG = ("epochs", "eval_freq")


@dataclass
class ScaleOptions:
    data_root: str | None = None  # dataset root; None runs the smoke job on a generated tree
    imagenet_root: str | None = None  # ILSVRC12 val for WebVision; default <data_root>/imagenet if present
    loader: str = "auto"  # auto (DALI when installed) | dali | torch
    dali_device: str = "auto"  # auto (mixed with a GPU, else cpu) | cpu | mixed
    workers: int | None = None  # DataLoader workers (0: in-process) / DALI threads per rank; None: the
    # rank's share of the cores (at most 16)
    crop: int = 224
    resize: int = 256  # evaluation: shorter side resized to this, then centre crop
    # (Clothing1M: both sides, in training too, as the official code)
    input_dtype: str = "auto"  # auto (bf16 with CUDA + amp, else fp32) | fp32 | fp16 | bf16
    sync_bn: bool = False
    balanced_samples: int = 0  # Clothing1M: class-balanced draw of this many per epoch; 0: all
    check: str = "decode"  # list validation level, see train/scale/validate.py
    max_bad_fraction: float = 0.05
    arch: str | None = None  # "tiny_convnet" replaces cfg.model (tests, quick checks)
    log_interval: int = 50  # steps between throughput lines
    webvision_classes: int = MINI_WEBVISION_CLASSES

    def validate(self) -> ScaleOptions:
        """Returns self; a UserError names the first bad option."""
        checks = [
            (self.loader in LOADERS, "loader", self.loader, f"one of {', '.join(LOADERS)}"),
            (
                self.dali_device in DALI_DEVICES,
                "dali_device",
                self.dali_device,
                f"one of {', '.join(DALI_DEVICES)}",
            ),
            (
                self.input_dtype in INPUT_DTYPES,
                "input_dtype",
                self.input_dtype,
                f"one of {', '.join(INPUT_DTYPES)}",
            ),
            (self.check in LEVELS, "check", self.check, f"one of {', '.join(LEVELS)}"),
            (self.arch in (None, TINY), "arch", self.arch, f"{TINY} or none"),
            (self.crop >= 8, "crop", self.crop, "8 or more"),
            (self.resize >= self.crop, "resize", self.resize, f"at least --crop ({self.crop})"),
            ((self.workers or 0) >= 0, "workers", self.workers, "0 or more"),
            (self.balanced_samples >= 0, "balanced_samples", self.balanced_samples, "0 (all) or more"),
            (0 <= self.max_bad_fraction <= 1, "max_bad_fraction", self.max_bad_fraction, "in [0, 1]"),
            (self.log_interval >= 1, "log_interval", self.log_interval, "1 or more"),
            (
                1 <= self.webvision_classes <= 1000,
                "webvision_classes",
                self.webvision_classes,
                "in [1, 1000]",
            ),
        ]
        for ok, name, value, accepted in checks:
            if not ok:
                raise UserError(f"--{name} {value}: must be {accepted}")
        return self

    def save(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / OPTIONS_FILE, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: Path, overrides: dict) -> ScaleOptions:
        """The stored options with `overrides` applied; a damaged file is a UserError."""
        path = Path(run_dir) / OPTIONS_FILE
        try:
            stored = json.loads(path.read_text())
            return cls(**{**stored, **overrides}).validate()
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"--resume {run_dir}: {OPTIONS_FILE} is missing or damaged ({exc})") from None


OPTION_NAMES = tuple(f.name for f in fields(ScaleOptions))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.imagenet_scale",
        description="DALI-fed DDP training for mini-WebVision (+ ILSVRC12 val) and Clothing1M. Launch with "
        "torchrun --nproc_per_node N for N GPUs. With no --data_root: a smoke job on a generated tree.",
        epilog="A new run claims a fresh folder <out_dir>/<name>; an existing one is refused unless "
        "--overwrite. "
        "The default name is <time>-<dataset>-<loss>-s<seed>-<config hash>, with -2, -3 ... for runs "
        "started in the same second. Mistakes in the flags exit with status 2 before anything is created.",
    )
    p.add_argument(
        "--config",
        metavar="PRESET|JSON",
        help=f"config preset of train/configs/ ({', '.join(PRESETS)}) or a .json path; needed with "
        f"--data_root (the smoke job has its own)",
    )
    several(
        p,
        "--set",
        default=[],
        metavar="KEY=VALUE",
        help=f"config overrides, e.g. epochs=10 lr=0.2; with --resume only {' and '.join(RESUMABLE_CONFIG)}",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last.pt (any world size); it may change only where and how the "
        f"data is read (--{', --'.join(RESUMABLE_OPTIONS)}) and --set "
        f"{' / '.join(RESUMABLE_CONFIG)}",
    )
    p.add_argument("--run_epochs", type=int, metavar="N", help="stop after epoch N (continue with --resume)")
    p.add_argument(
        "--name",
        help="run folder name under out_dir (refused if it exists, see --overwrite); "
        "default: <time>-<dataset>-<loss>-s<seed>-<config hash>",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="with --name: replace an existing run folder of that name (its results are deleted)",
    )
    p.add_argument("--out_dir", help="parent of run folders (default: the config's, runs/)")
    p.add_argument(
        "--quiet", action="store_true", help="no console log or progress bar; only the result line"
    )
    # ScaleOptions: default None = "not given", so --resume keeps the stored value
    p.add_argument("--data_root", help="WebVision or Clothing1M root (omit for the smoke job)")
    p.add_argument(
        "--imagenet_root",
        help="ILSVRC12 root with val/ (+ devkit) for WebVision runs (default: <data_root>/imagenet if it "
        "has val/)",
    )
    p.add_argument("--loader", choices=LOADERS, help="auto: DALI when installed, else the torch DataLoader")
    p.add_argument(
        "--dali_device", choices=DALI_DEVICES, help="where DALI decodes; auto: mixed with a GPU, else cpu"
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="DataLoader workers (0: in-process) or DALI threads per process; default: this process's "
        "share of the cores, at most 16",
    )
    p.add_argument("--crop", type=int, metavar="PX", help="training / evaluation crop size (default 224)")
    p.add_argument(
        "--resize",
        type=int,
        metavar="PX",
        help="evaluation: shorter side resized to this before the centre crop (default 256); "
        "Clothing1M: both sides, in training and evaluation, as the official code",
    )
    p.add_argument(
        "--input_dtype",
        choices=INPUT_DTYPES,
        help="dtype of the model input; auto: bf16 on CUDA with amp, else fp32 (fp16 / bf16 need CUDA "
        "with amp)",
    )
    p.add_argument(
        "--sync_bn", action="store_const", const=True, help="SyncBatchNorm over the processes (CUDA only)"
    )
    p.add_argument(
        "--balanced_samples",
        type=int,
        metavar="N",
        help="Clothing1M: class-balanced draw of N samples per epoch (default 0: the whole list)",
    )
    p.add_argument(
        "--check",
        choices=LEVELS,
        help="list validation level before training (default decode; see train/scale/validate.py)",
    )
    p.add_argument(
        "--max_bad_fraction",
        type=float,
        metavar="F",
        help="stop if more than this fraction of a list is missing or corrupt (default 0.05)",
    )
    p.add_argument("--arch", choices=[TINY], help="replace the config's model (tests, quick checks)")
    p.add_argument(
        "--log_interval", type=int, metavar="STEPS", help="steps between throughput lines (default 50)"
    )
    p.add_argument(
        "--webvision_classes",
        type=int,
        metavar="C",
        help="WebVision: train on the first C classes (default 50, mini-WebVision)",
    )
    return p


def given_options(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in OPTION_NAMES if getattr(args, k, None) is not None}


def _check_config_name(name: str) -> None:
    """A preset or .json path, named in the message with the presets imagenet_scale trains."""
    try:
        resolve_config_path(name)
    except (FileNotFoundError, ValueError):
        raise UserError(
            f"--config {name}: no such preset or .json file; presets: {', '.join(PRESETS)}"
        ) from None


def resolve(args: argparse.Namespace):
    """(Config, ScaleOptions, smoke) for a new run, from the flags."""
    options = given_options(args)
    smoke = options.get("data_root") is None
    if not smoke and not args.config:
        raise UserError(
            f"--data_root {options['data_root']}: needs --config, one of {', '.join(PRESETS)} or a "
            f".json path (only the smoke job, without --data_root, has a built-in config)"
        )
    if args.run_epochs is not None and args.run_epochs < 1:
        raise UserError(f"--run_epochs {args.run_epochs}: must be 1 or more")
    base = {}
    if smoke:  # a given config keeps its recipe, shrunk to the generated tree
        base = SMOKE_CONFIG if not args.config else {k: SMOKE_CONFIG[k] for k in SMOKE_SIZES}
        options = {**SMOKE_OPTIONS, **options}
    if args.config:
        _check_config_name(args.config)
    runtime = {k: getattr(args, k) for k in ("name", "out_dir") if getattr(args, k)}
    # load_config names a bad key or value itself (a UserError)
    cfg = load_config(
        args.config, [f"{k}={json.dumps(v)}" for k, v in {**base, **runtime}.items()] + list(args.set)
    )
    if cfg.dataset not in DATASETS:
        raise UserError(
            f"config dataset {cfg.dataset!r}: imagenet_scale trains {' and '.join(DATASETS)} "
            f"(presets: {', '.join(PRESETS)}); the other datasets train with python -m train run"
        )
    if smoke and cfg.dataset != "webvision":
        raise UserError(
            f"config dataset {cfg.dataset!r}: the smoke job (no --data_root) runs on a generated "
            f"WebVision tree; give --data_root for {cfg.dataset}"
        )
    if args.overwrite and not cfg.name:
        raise UserError("--overwrite: needs --name (a default name always claims a fresh folder)")
    return cfg, ScaleOptions(**options).validate(), smoke
