"""Experiment configuration: one dataclass, JSON presets in train/configs/, `key=value` overrides.

load_config("cifar10_drainage", ["noise_rate=0.45", "loss_params.alpha=0.5"]) reads
train/configs/cifar10_drainage.json (or any path), applies the overrides and validates the result.
The Drainage authors' nested JSON ({"model": .., "loss": .., "dataset": .., "optim": ..}) loads too.
write_run_info(run_dir, cfg) writes the resolved config.json and env.json next to the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

CONFIG_DIR = Path(__file__).parent / "configs"
SCHEDULERS = ("cosine", "step", "none")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class Config:
    """Everything one training run depends on (defaults: an untuned digits run; see train/configs/)."""

    description: str = ""
    # data and noise
    dataset: str = "digits"          # digits | mnist | cifar10 | cifar100 | cifar10n | cifar100n
    data_root: str = "data"
    download: bool = True            # fetch missing dataset files (needs internet)
    noise_type: str = "asym"         # none | sym | asym | instance | human
    noise_rate: float = 0.4
    human_label: str | None = None   # CIFAR-N key or CLI name (worst, aggre, rand1..3); None: the paper's
    tuning: bool = False             # 80/20 split of the training set, evaluate on the clean 20%
    # model and loss
    model: str = "digits_mlp"
    pretrained: str | None = None    # resnet50: IMAGENET1K_V1 | IMAGENET1K_V2
    loss: str = "drainage"
    loss_params: dict = field(default_factory=dict)
    l1_delta: float = 0.0            # adds l1_delta * sum |theta| to the loss when > 0
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "cosine"        # cosine (T_max = epochs) | step (step_size, gamma per epoch) | none
    step_size: int = 1
    gamma: float = 0.1
    eta_min: float = 0.0
    epochs: int = 60
    batch_size: int = 128
    eval_batch_size: int = 1024
    grad_clip: float = 5.0           # max global gradient norm; 0 disables
    # runtime
    seed: int = 1
    eval_freq: int = 1               # evaluate every N epochs (and always on the first and last)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    cpu_threads: int = 0             # torch intra-op threads for this run; 0: torch's default. Tiny models
                                     # run fastest on 1 (measured on a busy 2-core machine: digits MLP step
                                     # 2.4 ms on 1 thread, 26 ms on 2)
    amp: bool = True                 # bf16 autocast on CUDA; ignored on the CPU
    channels_last: bool = True       # CUDA only
    compile: bool = False            # torch.compile the model
    deterministic: bool = False      # cuDNN deterministic kernels (slower)
    train_stats: bool = True         # per-sample p_d / confidence on the training set at each evaluation
    # outputs
    out_dir: str = "runs"
    name: str | None = None          # run folder name; default <time>-<dataset>-<loss>-<noise>-s<seed>
    tb: bool = False                 # TensorBoard event files in the run folder
    checkpoint: bool = True          # atomic checkpoint after every epoch (needed by --resume)

    def validate(self) -> Config:
        """Checks names and ranges; returns self. Raises ValueError naming the bad field."""
        from .data import DATASETS, LARGE_SCALE
        from .losses import build_loss, canonical_loss_name
        from .models import canonical_model_name
        from .noise import NOISE_TYPES

        self.loss = canonical_loss_name(self.loss)
        self.model = canonical_model_name(self.model)
        build_loss(self.loss, 2, **self.loss_params)  # rejects unknown loss parameters
        checks = [
            (self.dataset in DATASETS + LARGE_SCALE,
             f"dataset {self.dataset!r} not in {DATASETS + LARGE_SCALE}"),
            (self.noise_type in NOISE_TYPES, f"noise_type {self.noise_type!r} not in {NOISE_TYPES}"),
            (0.0 <= self.noise_rate <= 1.0, f"noise_rate {self.noise_rate} not in [0, 1]"),
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} not in {OPTIMIZERS}"),
            (self.scheduler in SCHEDULERS, f"scheduler {self.scheduler!r} not in {SCHEDULERS}"),
            (self.epochs >= 1 and self.batch_size >= 2, "epochs must be >= 1 and batch_size >= 2"),
            (self.eval_freq >= 1, f"eval_freq {self.eval_freq} must be >= 1"),
            (self.l1_delta >= 0 and self.grad_clip >= 0, "l1_delta and grad_clip must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"config: {message}")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def from_authors_json(raw: dict) -> dict:
    """The Drainage / ANL authors' nested config -> our flat fields (same hyper-parameters)."""
    model, loss, data, optim = (dict(raw.get(k, {})) for k in ("model", "loss", "dataset", "optim"))
    loss_name = loss.pop("name")
    l1 = loss.pop("delta", 0.0)
    for bookkeeping in ("pass_model_to_loss", "drainage_idx", "is_anl", "reduction"):
        loss.pop(bookkeeping, None)
    flat = {
        "model": model["name"], "loss": loss_name, "loss_params": loss, "l1_delta": l1,
        "dataset": data["name"],
        "batch_size": data.get("train_batchsize", 128), "eval_batch_size": data.get("test_batchsize", 1024),
        "epochs": optim["total_epoch"], "optimizer": optim["optimizer"], "lr": optim["learning_rate"],
        "momentum": optim.get("momentum", 0.9), "weight_decay": optim.get("weight_decay", 0.0),
        "nesterov": optim.get("nesterov", False), "grad_clip": optim.get("grad_bound", 5.0),
        "scheduler": {"steplr": "step"}.get(optim["scheduler"], optim["scheduler"]),
    }
    if flat["scheduler"] == "step":
        flat.update(step_size=optim["step_size"], gamma=optim["gamma"])
    if flat["scheduler"] == "cosine":
        flat["eta_min"] = optim.get("eta_min", 0.0)
    return flat


def parse_override(item: str) -> tuple[str, object]:
    """"key=value" -> (key, value); value parsed as JSON when it is JSON (numbers, true, null, [...])."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} is not key=value")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.strip(), value


def apply_overrides(values: dict, overrides) -> dict:
    """Applies {"key": value} or ["key=value", ...]; "loss_params.alpha=0.5" sets one loss parameter."""
    pairs = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    values = {**values, "loss_params": dict(values.get("loss_params", {}))}
    for key, value in pairs:
        if key.startswith("loss_params."):
            values["loss_params"][key.split(".", 1)[1]] = value
        elif key in FIELDS:
            values[key] = value
        else:
            raise ValueError(f"unknown config key {key!r}; valid keys: {sorted(FIELDS)}")
    return values


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return path
    stem = path.stem.replace("alpha_dl", "drainage")
    candidate = CONFIG_DIR / f"{stem}.json"
    if not candidate.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no config {name_or_path!r}: not a .json file, and not one of {known}")
    return candidate


def load_config(name_or_path: str | None = None, overrides=None) -> Config:
    """A validated Config from a preset name / JSON path (None: the defaults) plus overrides."""
    values: dict = {}
    if name_or_path:
        raw = json.loads(resolve_config_path(name_or_path).read_text())
        values = from_authors_json(raw) if "optim" in raw else raw
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise ValueError(f"{name_or_path}: unknown config keys {unknown}")
    return Config(**apply_overrides(values, overrides)).validate()


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, git commit and device: what is needed to reproduce or explain a result."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import drainage_fast

    device = torch.device(device) if device is not None else None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "numpy": np.__version__, "drainage_fast": drainage_fast.__version__,
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "device": str(device) if device else None,
        "device_name": (torch.cuda.get_device_name(device) if device and device.type == "cuda"
                        else platform.processor()),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "argv": sys.argv,
    }


def write_run_info(run_dir: str | Path, cfg: Config, device=None) -> None:
    """config.json (the resolved config; `train run --config <run_dir>/config.json` repeats the run) and
    env.json, in run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    (run_dir / "env.json").write_text(json.dumps(environment(device), indent=1) + "\n")
