"""The model of a large run, ready for DDP: built by train/models.py (resnet50 for the paper's runs) or,
for tests and quick checks, a tiny BatchNorm-free CNN; then SyncBatchNorm, channels_last, DDP and
torch.compile as asked.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..losses import num_outputs
from ..models import build_model
from .distributed import DistContext, barrier

TINY = "tiny_convnet"


def tiny_convnet(outputs: int, width: int = 16) -> nn.Module:
    """conv(3->w, s2) -> ReLU -> conv(w->2w, s2) -> ReLU -> global average -> linear. No BatchNorm, so a
    2-process DDP run equals a 1-process run without SyncBatchNorm (the DDP test relies on it)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, outputs),
    )


def build_scale_model(cfg, arch: str | None, num_classes: int, ctx: DistContext) -> nn.Module:
    """cfg.model (or `arch` = "tiny_convnet") with num_outputs(cfg.loss, C) logits. Rank 0 builds first,
    so pretrained weights are downloaded once into torch.hub's cache before the other ranks read it."""
    outputs = num_outputs(cfg.loss, num_classes)

    def build():
        return tiny_convnet(outputs) if arch == TINY else build_model(cfg.model, outputs, cfg.pretrained)

    model = build() if ctx.is_main else None
    barrier(ctx)
    return model if model is not None else build()


def prepare_for_training(
    model: nn.Module, ctx: DistContext, *, sync_bn: bool, channels_last: bool, compile_model: bool
) -> tuple[nn.Module, nn.Module]:
    """(module that owns the parameters, module to call for training). DDP's initial broadcast makes
    every rank start from rank 0's weights."""
    if sync_bn and ctx.distributed:  # CUDA only: checked with the flags (train/scale/start.py check_runtime)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(
        ctx.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    train_model = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if compile_model:
        train_model = torch.compile(train_model)
    return model, train_model
