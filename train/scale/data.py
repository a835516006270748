"""The one place that builds a large run's data: parse the lists, validate them, pick the loader
(DALI or the torch DataLoader) and hand the loop batches ready for the model.

Both loaders yield (images (B, H, W, 3), labels (B,)): DALI's already normalised (float16 / float32),
the torch path's as uint8. to_model_input moves them to the device, normalises uint8 there and permutes
to (B, 3, H, W); the permuted HWC batch is already channels_last in memory, so no copy is made for it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .distributed import DistContext
from .lists import DatasetSpec, build_dataset, class_balanced_subset
from .options import ScaleOptions
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform
from .validate import check_list, describe, drop_bad

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dali_installed() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def resolve_loader(options: ScaleOptions) -> str:
    if options.loader == "auto":
        return "dali" if dali_installed() else "torch"
    if options.loader == "dali" and not dali_installed():
        raise ImportError("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or use --loader torch)")
    return options.loader


def resolve_input_dtype(options: ScaleOptions, cfg, device: torch.device) -> torch.dtype:
    if options.input_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and cfg.amp else torch.float32
    return DTYPES[options.input_dtype]


def default_workers(ctx: DistContext) -> int:
    return max(1, min(16, (os.cpu_count() or 1) // ctx.local_world_size))


def load_lists(cfg, options: ScaleOptions, ctx: DistContext, cache_dir: Path, log: logging.Logger) -> DatasetSpec:
    """The dataset's lists with missing / corrupt files counted, reported and removed (before training)."""
    imagenet = options.imagenet_root
    if imagenet is None and cfg.dataset == "webvision" and (Path(options.data_root) / "imagenet" / "val").is_dir():
        imagenet = str(Path(options.data_root) / "imagenet")
    spec = build_dataset(cfg.dataset, options.data_root, imagenet, options.webvision_classes)
    if cfg.dataset == "webvision" and imagenet is None:
        log.info("no ILSVRC12 val found (--imagenet_root); evaluating on WebVision val only")
    threads = max(1, options.workers if options.workers is not None else default_workers(ctx))
    for images in (spec.train, *spec.evals.values()):
        result = check_list(images, options.check, ctx, cache_dir, threads)
        log.info(describe(result, images) + "".join(f"; {k}: {v}" for k, v in images.notes.items() if v))
        cleaned = drop_bad(images, result, options.max_bad_fraction)
        if images is spec.train:
            spec.train = cleaned
        else:
            spec.evals[images.name] = cleaned
    if len(spec.train) == 0 or len(spec.evals[spec.select]) == 0:
        raise ValueError(f"{cfg.dataset}: no usable training or {spec.select} images under {options.data_root}")
    spec.evals = {name: images for name, images in spec.evals.items() if len(images)}
    return spec


@dataclass
class Loaders:
    """What the loop iterates: loaders.train.epoch(e, indices) and loaders.evals[name]."""

    kind: str
    train: object
    evals: dict
    dtype: torch.dtype
    channels_last: bool
    device: torch.device
    normalise: bool   # the batches are uint8 (torch path) and are normalised on the device


def build_loaders(spec: DatasetSpec, cfg, options: ScaleOptions, ctx: DistContext) -> Loaders:
    kind = resolve_loader(options)
    for name, size in (("batch_size", cfg.batch_size), ("eval_batch_size", cfg.eval_batch_size)):
        if size % ctx.world_size:
            raise ValueError(f"config {name}={size} (global) is not divisible by the world size {ctx.world_size}")
    batch, eval_batch = cfg.batch_size // ctx.world_size, cfg.eval_batch_size // ctx.world_size
    color_jitter, cutout = cfg.dataset == "webvision", (options.crop // 2 if cfg.dataset == "clothing1m" else 0)
    workers = options.workers if options.workers is not None else default_workers(ctx)
    dtype = resolve_input_dtype(options, cfg, ctx.device)
    channels_last = cfg.channels_last and ctx.device.type == "cuda"
    if kind == "dali":
        from .dali_pipeline import DaliEvalLoader, DaliTrainLoader, PipelineSpec

        decode = options.dali_device if options.dali_device != "auto" else (
            "mixed" if ctx.device.type == "cuda" else "cpu")
        device_id = ctx.device.index if ctx.device.type == "cuda" else None
        pipe = PipelineSpec(options.crop, options.resize, decode, device_id, max(1, workers),
                            fp16=dtype != torch.float32, color_jitter=color_jitter, cutout=cutout)
        train = DaliTrainLoader(spec.train, batch, pipe, cfg.seed, ctx.rank, ctx.world_size)
        evals = {name: DaliEvalLoader(images, eval_batch, pipe, ctx.rank, ctx.world_size)
                 for name, images in spec.evals.items()}
    else:
        from .torch_loader import TorchEvalLoader, TorchTrainLoader

        pin = ctx.device.type == "cuda"
        train = TorchTrainLoader(spec.train, TrainTransform(options.crop, color_jitter, cutout), cfg.batch_size,
                                 cfg.seed, ctx.rank, ctx.world_size, workers, pin)
        evals = {name: TorchEvalLoader(images, EvalTransform(options.crop, options.resize), eval_batch, ctx.rank,
                                       ctx.world_size, workers, pin)
                 for name, images in spec.evals.items()}
    return Loaders(kind, train, evals, dtype, channels_last, ctx.device, normalise=kind == "torch")


def epoch_indices(spec: DatasetSpec, options: ScaleOptions, seed: int, epoch: int) -> np.ndarray:
    """The training entries of `epoch`: all, or Clothing1M's class-balanced draw of balanced_samples."""
    if options.balanced_samples:
        return class_balanced_subset(spec.train.labels, options.balanced_samples, spec.num_classes, seed, epoch)
    return np.arange(len(spec.train))


_NORMALISERS: dict = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _NORMALISERS:
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        _NORMALISERS[device] = (mean, std)
    return _NORMALISERS[device]


def to_model_input(images: torch.Tensor, loaders: Loaders) -> torch.Tensor:
    """(B, H, W, 3) batch -> (B, 3, H, W) on the device in the input dtype (channels_last on CUDA)."""
    x = images.to(loaders.device, non_blocking=True).permute(0, 3, 1, 2)
    if loaders.normalise:
        mean, std = _mean_std(loaders.device)
        x = (x.float() - mean) / std
    x = x.to(loaders.dtype)
    return x.contiguous(memory_format=torch.channels_last if loaders.channels_last else torch.contiguous_format)
