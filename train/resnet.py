"""Moved to train/models/resnet.py. This alias only keeps benchmarks/gpu_resnet50_step.py (`from
train.resnet import resnet50`) working until it imports train.models.resnet; then delete this file."""

from .models.resnet import RESNET50_WEIGHTS, resnet34_cifar, resnet50

__all__ = ["RESNET50_WEIGHTS", "resnet34_cifar", "resnet50"]
