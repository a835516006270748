"""Experiment configuration: one dataclass, JSON presets in train/configs/, `key=value` overrides.

load_config("cifar10_drainage", ["noise_rate=0.45", "loss_params.alpha=0.5"]) reads
train/configs/cifar10_drainage.json (or any path), applies the overrides and validates the result.
The Drainage authors' nested JSON ({"model": .., "loss": .., "dataset": .., "optim": ..}) loads too.
write_run_info(run_dir, cfg) writes the resolved config.json and env.json next to the results.

Every value, from a preset or an override, is read by the type its Config field declares: int fields
take integers only (epochs=2.5 is refused), bool fields true/false/yes/no/on/off/1/0 in any case,
optional fields null (or none), loss_params a JSON object, loss_params.<name> a JSON number or a word.
A bad key or value is a UserError naming it and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .run_dirs import UserError, atomic_write_text

CONFIG_DIR = Path(__file__).parent / "configs"
SCHEDULERS = ("cosine", "step", "none")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class Config:
    """Everything one training run depends on (defaults: an untuned digits run; see train/configs/)."""

    description: str = ""
    # data and noise
    dataset: str = "digits"  # digits | mnist | cifar10 | cifar100 | cifar10n | cifar100n
    data_root: str = "data"
    download: bool = True  # fetch missing dataset files (needs internet)
    noise_type: str = "asym"  # none | sym | asym | instance | human
    noise_rate: float = 0.4
    human_label: str | None = None  # CIFAR-N key or CLI name (worst, aggre, rand1..3); None: the paper's
    tuning: bool = False  # 80/20 split of the training set, evaluate on the clean 20%
    coverage: float | None = None  # the abstention rule: train on the 80%, choose on the other 20% the
    # threshold of the model's confidence that accepts this share, apply it to the test set
    # (predictions.csv); null: train on all of the training set, no rule
    # model and loss
    model: str = "digits_mlp"
    pretrained: str | None = None  # resnet50: IMAGENET1K_V1 | IMAGENET1K_V2
    loss: str = "drainage"
    loss_params: dict = field(default_factory=dict)
    l1_delta: float = 0.0  # adds l1_delta * sum |theta| to the loss when > 0
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # cosine (T_max = epochs) | step (step_size, gamma per epoch) | none
    step_size: int = 1
    gamma: float = 0.1
    eta_min: float = 0.0
    epochs: int = 60
    batch_size: int = 128
    eval_batch_size: int = 1024
    grad_clip: float = 5.0  # max global gradient norm; 0 disables
    # runtime
    seed: int = 1
    eval_freq: int = 1  # evaluate every N epochs (and always on the first and last)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cpu_threads: int = 0  # torch intra-op threads for this run; 0: torch's default. Tiny models
    # run fastest on 1 (measured on a busy 2-core machine: digits MLP step
    # 2.4 ms on 1 thread, 26 ms on 2)
    amp: bool = False  # bf16 autocast on CUDA (opt-in; ignored on the CPU). Off: fp32, as the
    # official code trains (no autocast in its trainer.py)
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # cuDNN deterministic kernels (slower)
    train_stats: bool = True  # per-sample p_d / confidence on the training set at each evaluation
    # outputs
    out_dir: str = "runs"
    name: str | None = None  # run folder name; default <time>-<dataset>-<loss>-<noise>-s<seed>-<hash>
    tb: bool = False  # TensorBoard event files in the run folder
    checkpoint: bool = True  # keep last.pt (and best.pt) once the run is finished; false: last.pt is
    # still written every epoch (a cut run continues from it) and dropped when the run finishes

    def validate(self) -> Config:
        """Checks names and ranges; returns self. Raises UserError naming the bad field and value."""
        from drainage_fast import backends

        from .data import DATASETS, HUMAN_NOISE_ALIASES, LARGE_SCALE
        from .losses import build_loss, canonical_loss_name, check_schedule
        from .models import canonical_model_name
        from .models.resnet import RESNET50_WEIGHTS
        from .noise import NOISE_TYPES, has_asymmetric_map

        self.loss = canonical_loss_name(self.loss)
        self.model = canonical_model_name(self.model)
        loss = build_loss(self.loss, 2, **self.loss_params)  # rejects unknown parameters and non-numbers
        checks = [
            ("dataset", self.dataset in DATASETS + LARGE_SCALE, f"one of {DATASETS + LARGE_SCALE}"),
            ("noise_type", self.noise_type in NOISE_TYPES, f"one of {NOISE_TYPES}"),
            ("noise_rate", 0.0 <= self.noise_rate <= 1.0, "a number in [0, 1]"),
            ("coverage", self.coverage is None or 0.0 < self.coverage <= 1.0, "null or a number in (0, 1]"),
            (
                "coverage",
                self.coverage is None or not self.tuning,
                "null when tuning=true (the rule is chosen on the tuning split and applied to the test "
                "set, which a tuning run never touches)",
            ),
            (
                "noise_type",
                self.noise_type != "asym"
                or self.dataset in LARGE_SCALE + tuple(HUMAN_NOISE_ALIASES)
                or has_asymmetric_map(self.dataset),
                f"another noise type for {self.dataset}: it has no asymmetric flip map (see train/noise.py)",
            ),
            (
                "pretrained",
                self.pretrained in (None, *RESNET50_WEIGHTS),
                f"null or one of {sorted(RESNET50_WEIGHTS)}",
            ),
            (
                "pretrained",
                not self.pretrained or self.model == "resnet50",
                f"null for model {self.model!r} (pretrained weights exist for resnet50 only)",
            ),
            (
                "loss_params.backend",
                self.loss_params.get("backend", "auto") in ("auto", *backends.NAMES),
                f"one of {('auto', *backends.NAMES)}",
            ),
            ("l1_delta", self.l1_delta >= 0, "a number >= 0"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
            ("lr", self.lr > 0, "a number > 0"),
            ("momentum", 0 <= self.momentum < 1, "a number in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("scheduler", self.scheduler in SCHEDULERS, f"one of {SCHEDULERS}"),
            ("step_size", self.step_size >= 1, "an integer >= 1"),
            ("gamma", self.gamma > 0, "a number > 0"),
            ("eta_min", self.eta_min >= 0, "a number >= 0"),
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 2, "an integer >= 2 (BatchNorm trains on 2 or more)"),
            ("eval_batch_size", self.eval_batch_size >= 1, "an integer >= 1"),
            ("grad_clip", self.grad_clip >= 0, "a number >= 0 (0: no clipping)"),
            ("eval_freq", self.eval_freq >= 1, "an integer >= 1"),
            (
                "device",
                re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                "auto, cpu, cuda or cuda:N",
            ),
            ("cpu_threads", self.cpu_threads >= 0, "an integer >= 0 (0: torch's default)"),
            (
                "name",
                self.name is None
                or re.fullmatch(r"[^/\\]+", self.name) is not None
                and self.name not in (".", ".."),
                "a folder name without / (or null: a default name)",
            ),
        ]
        for key, ok, accepted in checks:
            if not ok:
                value = (
                    self.loss_params.get("backend") if key == "loss_params.backend" else getattr(self, key)
                )
                raise UserError(f"{key}={shown(value)}: must be {accepted}")
        check_schedule(loss, self.epochs)  # a warm-up that leaves the loss itself no epoch
        return self


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def from_authors_json(raw: dict) -> dict:
    """The Drainage / ANL authors' nested config -> our flat fields (same hyper-parameters), trained as
    the official code trains (https://github.com/ZKI-PH-ImageAnalysis/Drainage, commit 3359c4b): in fp32
    (amp false: its trainer.py has no autocast), and a resnet50 ImageNet-pretrained (IMAGENET1K_V2) for
    every dataset but WebVision (utils.py get_model: `resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)`
    unless dataset_name == 'webvision'), i.e. for Clothing1M."""
    model, loss, data, optim = (dict(raw.get(k, {})) for k in ("model", "loss", "dataset", "optim"))
    loss_name = loss.pop("name")
    l1 = loss.pop("delta", 0.0)
    for bookkeeping in ("pass_model_to_loss", "drainage_idx", "is_anl", "reduction"):
        loss.pop(bookkeeping, None)
    flat = {
        "model": model["name"],
        "loss": loss_name,
        "loss_params": loss,
        "l1_delta": l1,
        "dataset": data["name"],
        "batch_size": data.get("train_batchsize", 128),
        "eval_batch_size": data.get("test_batchsize", 1024),
        "epochs": optim["total_epoch"],
        "optimizer": optim["optimizer"],
        "lr": optim["learning_rate"],
        "momentum": optim.get("momentum", 0.9),
        "weight_decay": optim.get("weight_decay", 0.0),
        "nesterov": optim.get("nesterov", False),
        "grad_clip": optim.get("grad_bound", 5.0),
        "scheduler": {"steplr": "step"}.get(optim["scheduler"], optim["scheduler"]),
        "amp": False,
    }
    if model["name"] == "resnet50" and data["name"] != "webvision":
        flat["pretrained"] = "IMAGENET1K_V2"
    if flat["scheduler"] == "step":
        flat.update(step_size=optim["step_size"], gamma=optim["gamma"])
    if flat["scheduler"] == "cosine":
        flat["eta_min"] = optim.get("eta_min", 0.0)
    return flat


FIELD_TYPES = typing.get_type_hints(Config)
BOOLEANS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def parse_value(key: str, value):
    """value (the text of a `key=value` override, or a value read from JSON) as the type Config declares
    for key; a loss_params.<name> value as a JSON number, true / false / null, or else the word itself.
    Raises UserError naming key, value and what the field takes."""
    if key.startswith("loss_params."):
        return json_or_word(value) if isinstance(value, str) else value
    declared = FIELD_TYPES[key]
    optional = type(None) in typing.get_args(declared)
    kind = next(t for t in typing.get_args(declared) if t is not type(None)) if optional else declared
    if optional and (value is None or isinstance(value, str) and value.lower() in ("null", "none")):
        return None
    text = value.strip() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in BOOLEANS:
            return BOOLEANS[text.lower()]
        accepted = "true or false (also yes / no, on / off, 1 / 0, in any case)"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        accepted = "an integer"
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(text)
        except (TypeError, ValueError):
            accepted = "a number"
    elif kind is dict:
        parsed = json_or_word(text) if text is not None else value
        if isinstance(parsed, dict):
            return parsed
        accepted = f"a JSON object, e.g. {key}='{{\"alpha\": 0.5}}' (or set one entry: {key}.alpha=0.5)"
    else:  # str; a JSON string literal ("adam", as json.dumps writes it) is unquoted
        if text is not None:
            parsed = json_or_word(value)
            return parsed if isinstance(parsed, str) else value
        accepted = "a word" + (" or null" if optional else "")
    raise UserError(f"{key}={shown(value)}: {key} takes {accepted}")


def shown(value) -> str:
    """A value as the user would write it after key= (text as it is, anything else as JSON)."""
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def json_or_word(text: str):
    """text as JSON where it reads as JSON (0.5, true, null, {...}), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(item: str) -> tuple[str, object]:
    """ "key=value" -> (key, value read by the key's declared type, see parse_value)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item}: an override is key=value, e.g. epochs=30 or loss_params.alpha=0.5")
    _check_key(key)
    return key, parse_value(key, text)


def _check_key(key: str) -> None:
    if key not in FIELDS and not (key.startswith("loss_params.") and len(key) > len("loss_params.")):
        raise UserError(f"unknown config key {key!r}; valid keys: {sorted(FIELDS)} and loss_params.<name>")


def apply_overrides(values: dict, overrides) -> dict:
    """Applies {"key": value} or ["key=value", ...]; "loss_params.alpha=0.5" sets one loss parameter.
    Every value is read by its declared type (parse_value)."""
    if isinstance(overrides, dict):
        for key in overrides:
            _check_key(key)
        pairs = [(key, parse_value(key, value)) for key, value in overrides.items()]
    else:
        pairs = [parse_override(item) for item in overrides or []]
    values = {key: parse_value(key, value) for key, value in values.items()}
    values["loss_params"] = dict(values.get("loss_params", {}))
    for key, value in pairs:
        if key.startswith("loss_params."):
            values["loss_params"][key.split(".", 1)[1]] = value
        else:
            values[key] = value
    return values


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return path
    stem = path.stem.replace("alpha_dl", "drainage")
    candidate = CONFIG_DIR / f"{stem}.json"
    if not candidate.exists():
        raise UserError(f"--config {name_or_path}: not a .json file, and not one of {preset_names()}")
    return candidate


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | None = None, overrides=None) -> Config:
    """A validated Config from a preset name / JSON path (None: the defaults) plus overrides."""
    values: dict = {}
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"--config {path}: not a readable JSON config ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(
                f"--config {path}: a config is a JSON object, this file holds a {type(raw).__name__}"
            )
        values = from_authors_json(raw) if "optim" in raw else raw
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise UserError(f"--config {path}: unknown config keys {unknown}")
    return Config(**apply_overrides(values, overrides)).validate()


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, git commit and device: what is needed to reproduce or explain a result."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import drainage_fast

    device = torch.device(device) if device is not None else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "drainage_fast": drainage_fast.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "device": str(device) if device else None,
        "device_name": (
            torch.cuda.get_device_name(device) if device and device.type == "cuda" else platform.processor()
        ),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
    }


def resolved(cfg: Config) -> dict:
    """The config as config.json holds it (JSON types): what two runs must share to be the same run."""
    return json.loads(json.dumps(asdict(cfg)))


def write_config(run_dir: str | Path, cfg: Config) -> None:
    """run_dir/config.json, the resolved config (`train run --config <run_dir>/config.json` repeats the
    run), written atomically: a resume that changes epochs rewrites it."""
    atomic_write_text(Path(run_dir) / "config.json", json.dumps(asdict(cfg), indent=1) + "\n")


def write_run_info(run_dir: str | Path, cfg: Config, device=None) -> None:
    """config.json (write_config) and env.json (versions, git commit, device), in run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    (run_dir / "env.json").write_text(json.dumps(environment(device), indent=1) + "\n")
