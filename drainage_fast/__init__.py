"""drainage_fast: the fused Drainage loss (Taha, Montavon, Koerber, CVPR 2026, arXiv 2512.03182)."""

from . import openset
from ._ext import NativeBuildWarning
from .api import DrainageLoss, available_backends, fused_drainage_loss
from .reference import drainage_loss_reference

__version__ = "0.1.0"
__all__ = [
    "DrainageLoss",
    "NativeBuildWarning",
    "available_backends",
    "drainage_loss_reference",
    "fused_drainage_loss",
    "openset",
]
