"""The members of the abstention family as the native-op tests call them: each member's public loss,
float64 oracle and hyper-parameters, the ops' trailing arguments, and sample weights of a stride."""

from __future__ import annotations

import torch
from support import DEVICE

import drainage_fast as df
from drainage_fast import reference as oracles
from drainage_fast._members import Member, dac_params, drainage_params, gamblers_params

# Each member's (h1, h2) as the ops take them (drainage_fast/_members.py).
MEMBER_PARAMS = {
    Member.DRAINAGE: drainage_params(2.0, 0.7),
    Member.GAMBLERS: gamblers_params(2.2),
    Member.DAC: dac_params(0.6),
    Member.CE_ALL: (0.0, 0.0),
    Member.CE_CLASSES: (0.0, 0.0),
}
# Each member's public loss and float64 oracle with the hyper-parameters of MEMBER_PARAMS, and the
# (alpha, beta) whose logs support.assert_*_close counts in the scale of the exponents.
FAMILY = {
    Member.DRAINAGE: (
        df.fused_drainage_loss,
        oracles.drainage_loss_reference,
        {"alpha": 2.0, "beta": 0.7},
        (2.0, 0.7),
    ),
    Member.GAMBLERS: (df.fused_gamblers_loss, oracles.gamblers_loss_reference, {"reward": 2.2}, (2.2, 1.0)),
    Member.DAC: (df.fused_dac_loss, oracles.dac_loss_reference, {"alpha": 0.6}, (1.0, 1.0)),
    Member.CE_ALL: (
        df.fused_cross_entropy_loss,
        oracles.cross_entropy_loss_reference,
        {"over": "all"},
        (1.0, 1.0),
    ),
    Member.CE_CLASSES: (
        df.fused_cross_entropy_loss,
        oracles.cross_entropy_loss_reference,
        {"over": "classes"},
        (1.0, 1.0),
    ),
}


def op_args(member, d, weight=None, ignore_index=-100) -> tuple:
    """The ops' trailing arguments: h1, h2, drainage_idx, ignore_index, member, weight."""
    return (*MEMBER_PARAMS[member], d, ignore_index, int(member), weight)


def strided_weights(n, dtype=torch.float64, seed=0, device=DEVICE) -> torch.Tensor:
    """n sample weights in [0.25, 1] (a row's error bound then holds for its weighted loss), every
    other element of a buffer: weights of any dtype and stride."""
    gen = torch.Generator().manual_seed(seed)
    return (0.25 + 0.75 * torch.rand(2 * n, generator=gen, dtype=torch.float64)).to(dtype)[::2].to(device)
