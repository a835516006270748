"""drainage_fast: the fused Drainage loss (Taha, Montavon, Koerber, CVPR 2026, arXiv 2512.03182) and
the abstention family it belongs to (Deep Gamblers, DAC, cross-entropy), on one fused kernel."""

from . import openset
from ._ext import NativeBuildWarning
from .api import (
    DACLoss,
    DrainageLoss,
    FusedCrossEntropyLoss,
    GamblersLoss,
    available_backends,
    fused_cross_entropy_loss,
    fused_dac_loss,
    fused_drainage_loss,
    fused_gamblers_loss,
)
from .linear import (
    FusedLinearLoss,
    fused_linear_cross_entropy_loss,
    fused_linear_dac_loss,
    fused_linear_drainage_loss,
    fused_linear_gamblers_loss,
)
from .reference import (
    cross_entropy_loss_reference,
    dac_loss_reference,
    drainage_loss_reference,
    gamblers_loss_reference,
)

__version__ = "0.1.0"
__all__ = [
    "DACLoss",
    "DrainageLoss",
    "FusedCrossEntropyLoss",
    "FusedLinearLoss",
    "GamblersLoss",
    "NativeBuildWarning",
    "available_backends",
    "cross_entropy_loss_reference",
    "dac_loss_reference",
    "drainage_loss_reference",
    "fused_cross_entropy_loss",
    "fused_dac_loss",
    "fused_drainage_loss",
    "fused_gamblers_loss",
    "fused_linear_cross_entropy_loss",
    "fused_linear_dac_loss",
    "fused_linear_drainage_loss",
    "fused_linear_gamblers_loss",
    "gamblers_loss_reference",
    "openset",
]
