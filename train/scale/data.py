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

from ..run_dirs import UserError
from .distributed import DistContext, agree
from .lists import LAYOUTS, DatasetSpec, build_dataset, class_balanced_subset, ilsvrc12_val
from .options import ScaleOptions
from .transforms import IMAGENET_MEAN, IMAGENET_STD, CentreCropTrainTransform, EvalTransform, TrainTransform
from .validate import check_list, describe, drop_bad

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dali_installed() -> bool:
    return (
        importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    )


def resolve_loader(options: ScaleOptions) -> str:
    if options.loader == "auto":
        return "dali" if dali_installed() else "torch"
    if options.loader == "dali" and not dali_installed():
        raise UserError(
            "--loader dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); "
            "--loader torch or auto work without it"
        )
    return options.loader


def resolve_input_dtype(options: ScaleOptions, cfg, device: torch.device) -> torch.dtype:
    if options.input_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and cfg.amp else torch.float32
    return DTYPES[options.input_dtype]


def default_workers(ctx: DistContext) -> int:
    return max(1, min(16, (os.cpu_count() or 1) // ctx.local_world_size))


def _parse_lists(cfg, options: ScaleOptions, log: logging.Logger) -> DatasetSpec:
    """The dataset's lists as listed; a missing or malformed file is a UserError naming the root flag."""
    imagenet = options.imagenet_root
    if (
        imagenet is None
        and cfg.dataset == "webvision"
        and (Path(options.data_root) / "imagenet" / "val").is_dir()
    ):
        imagenet = str(Path(options.data_root) / "imagenet")
    try:
        spec = build_dataset(cfg.dataset, options.data_root, options.webvision_classes)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(
            f"--data_root {options.data_root}: {exc}; a {cfg.dataset} root holds {LAYOUTS[cfg.dataset]}"
        ) from None
    if cfg.dataset == "webvision" and imagenet is not None:
        try:
            spec.evals["ilsvrc12_val"] = ilsvrc12_val(imagenet, options.webvision_classes)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            raise UserError(
                f"--imagenet_root {imagenet}: {exc}; an ILSVRC12 root holds {LAYOUTS['imagenet']}"
            ) from None
    elif cfg.dataset == "webvision":
        log.info("no ILSVRC12 val found (--imagenet_root); evaluating on WebVision val only")
    return spec


def load_lists(
    cfg, options: ScaleOptions, ctx: DistContext, cache_dir: Path | None, log: logging.Logger
) -> DatasetSpec:
    """The dataset's lists with missing / corrupt files counted, reported and removed (before training).
    Every rank parses the lists; a UserError on any rank is raised on all of them before the check's
    collectives start (a root missing on one node must not leave the others waiting)."""
    spec = agree(lambda: _parse_lists(cfg, options, log), ctx)
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
        raise UserError(f"--data_root {options.data_root}: no usable training or {spec.select} images")
    spec.evals = {name: images for name, images in spec.evals.items() if len(images)}
    return spec


def epoch_size(spec: DatasetSpec, options: ScaleOptions) -> int:
    """Training images per epoch: the list, or the size of Clothing1M's class-balanced draw (the same
    every epoch: up to balanced_samples // C of each class)."""
    if not options.balanced_samples:
        return len(spec.train)
    per_class = options.balanced_samples // spec.num_classes
    return int(np.minimum(np.bincount(spec.train.labels, minlength=spec.num_classes), per_class).sum())


def check_epoch_fits_batch(spec: DatasetSpec, cfg, options: ScaleOptions) -> None:
    """An epoch must hold one global batch: DALI stops with "no data in the pipeline" when a shard is
    smaller than its batch, and the torch path would train 0 steps."""
    images = epoch_size(spec, options)
    if cfg.batch_size > images:
        source = (
            f"--balanced_samples {options.balanced_samples} draws"
            if options.balanced_samples
            else "there are"
        )
        raise UserError(
            f"config batch_size={cfg.batch_size} (global): {source} only {images} usable training images "
            f"per epoch in {spec.train.name}; accepted: --set batch_size=N with N <= {images}"
        )


@dataclass
class Loaders:
    """What the loop iterates: loaders.train.epoch(e, indices) and loaders.evals[name]."""

    kind: str
    train: object
    evals: dict
    dtype: torch.dtype
    channels_last: bool
    device: torch.device
    normalise: bool  # the batches are uint8 (torch path) and are normalised on the device


def build_loaders(spec: DatasetSpec, cfg, options: ScaleOptions, ctx: DistContext) -> Loaders:
    kind = resolve_loader(options)
    batch, eval_batch = cfg.batch_size // ctx.world_size, cfg.eval_batch_size // ctx.world_size
    clothing1m = cfg.dataset == "clothing1m"  # the official code's fixed crops (train/scale/transforms.py)
    color_jitter, cutout = cfg.dataset == "webvision", (options.crop // 2 if clothing1m else 0)
    workers = options.workers if options.workers is not None else default_workers(ctx)
    dtype = resolve_input_dtype(options, cfg, ctx.device)
    channels_last = cfg.channels_last and ctx.device.type == "cuda"
    if kind == "dali":
        from .dali_pipeline import DaliEvalLoader, DaliTrainLoader, PipelineSpec

        decode = (
            options.dali_device
            if options.dali_device != "auto"
            else ("mixed" if ctx.device.type == "cuda" else "cpu")
        )
        device_id = ctx.device.index if ctx.device.type == "cuda" else None
        pipe = PipelineSpec(
            options.crop,
            options.resize,
            decode,
            device_id,
            max(1, workers),
            fp16=dtype != torch.float32,
            color_jitter=color_jitter,
            cutout=cutout,
            square_resize=clothing1m,
        )
        train = DaliTrainLoader(spec.train, batch, pipe, cfg.seed, ctx.rank, ctx.world_size)
        evals = {
            name: DaliEvalLoader(images, eval_batch, pipe, ctx.rank, ctx.world_size)
            for name, images in spec.evals.items()
        }
    else:
        from .torch_loader import TorchEvalLoader, TorchTrainLoader

        pin = ctx.device.type == "cuda"
        transform = (
            CentreCropTrainTransform(options.crop, options.resize, cutout)
            if clothing1m
            else TrainTransform(options.crop, color_jitter, cutout)
        )
        train = TorchTrainLoader(
            spec.train, transform, cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size, workers, pin
        )
        evals = {
            name: TorchEvalLoader(
                images,
                EvalTransform(options.crop, options.resize, square=clothing1m),
                eval_batch,
                ctx.rank,
                ctx.world_size,
                workers,
                pin,
            )
            for name, images in spec.evals.items()
        }
    return Loaders(kind, train, evals, dtype, channels_last, ctx.device, normalise=kind == "torch")


def epoch_indices(spec: DatasetSpec, options: ScaleOptions, seed: int, epoch: int) -> np.ndarray:
    """The training entries of `epoch`: all, or Clothing1M's class-balanced draw of balanced_samples."""
    if options.balanced_samples:
        return class_balanced_subset(
            spec.train.labels, options.balanced_samples, spec.num_classes, seed, epoch
        )
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
    return x.contiguous(
        memory_format=torch.channels_last if loaders.channels_last else torch.contiguous_format
    )
