"""Public API: the fused losses of the abstention family, their modules, available_backends.

Drainage, Deep Gamblers, DAC and cross-entropy over all outputs or over the C classes are members of
one family (_members.py): one fused kernel per backend serves them all, the member being a row
function and two runtime hyper-parameters.
"""

from __future__ import annotations

import torch

from . import backends
from ._function import HIGHER_ORDER_MESSAGE, DrainageFunction
from ._inputs import (
    WEIGHT_MESSAGE,
    check_inputs,
    check_options,
    check_sample_weight_values,
    check_target_values,
)
from ._members import Member, ce_member, dac_params, drainage_params, gamblers_params

# The backends of csrc/: their eager mean / sum is one op with a C++ autograd node.
NATIVE = ("cpp", "cuda")


def family_loss(
    member: int,
    params: tuple[float, float],
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    drainage_idx: int,
    reduction: str,
    ignore_index: int,
    sample_weight: torch.Tensor | None,
    backend: str,
    _fuse_grad: bool = True,
) -> torch.Tensor:
    """Any member of the family through the fused kernels: the body of the public fused_* losses."""
    hp = check_inputs(
        logits,
        target,
        params=params,
        member=member,
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
        check_targets=False,
    )
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(logits):
        raise RuntimeError(HIGHER_ORDER_MESSAGE)  # torch.func.grad / vmap / jacrev: see the message
    if sample_weight is not None and sample_weight.requires_grad and torch.is_grad_enabled():
        # d loss / d w_r is the row's loss: the kernels give the rows, torch weighs them, and autograd
        # takes both gradients. (The fused reduction never holds the rows' losses.)
        check_sample_weight_values(sample_weight)
        if sample_weight.device.type != "cpu" or torch.compiler.is_compiling():
            w = sample_weight.detach()
            torch._assert_async((torch.isfinite(w) & (w >= 0)).all(), WEIGHT_MESSAGE)
        rows = family_loss(
            member,
            params,
            logits,
            target,
            drainage_idx=drainage_idx,
            reduction="none",
            ignore_index=ignore_index,
            sample_weight=None,
            backend=backend,
        )
        weight = torch.where(target != hp.ignore_index, sample_weight.to(rows.dtype), 0.0)
        weighted = rows * weight
        if reduction == "none":
            return weighted
        return weighted.sum() / weight.sum() if reduction == "mean" else weighted.sum()
    impl = backends.load(backends.resolve_name(backend, logits.device.type))
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    fuse_grad = (
        _fuse_grad
        and impl.FUSED_GRAD
        and reduction != "none"
        and needs_grad
        and not torch.compiler.is_compiling()  # the one-shot buffer hand-out needs eager autograd
    )
    if impl.NAME in NATIVE and DrainageFunction.reduces_in_backend(reduction, fuse_grad, needs_grad):
        # DrainageFunction's fused path as one op with a C++ autograd node, whose kernels check and
        # count the targets: a small batch pays per Python call (backends/native.py).
        return impl.reduced_loss(logits, target, hp, reduction == "mean", sample_weight)
    if impl.NAME != "triton":  # its targets kernel checks them, and raises the same errors on the CPU
        check_target_values(target, logits.shape[1], hp.drainage_idx, hp.ignore_index)
        check_sample_weight_values(sample_weight)
    return DrainageFunction.apply(
        logits, target, sample_weight, hp, reduction, impl.NAME, fuse_grad, needs_grad
    )


_ARGS_DOC = """
    Args:
        logits: (N, K) or (N, K, d1, ..., dk), float16 / bfloat16 / float32 / float64, any strides;
            K = C classes + 1 drainage output (the abstain column). Math runs in float32 (float64
            for float64 input); the gradient has the dtype of the logits.
        target: (N,) or (N, d1, ..., dk) int64 or int32 class indices in [0, K), never
            drainage_idx; entries equal to ignore_index give 0 loss and 0 gradient.
        drainage_idx: index of the drainage (abstain) output in dim 1; negative counts from the end.
        reduction: "none" -> (N, d1, ..., dk) float32 losses (float64 for float64 input);
            "sum"; "mean" over the non-ignored targets (nan when all are ignored). With sample
            weights w: "none" gives w_r l_r, "mean" sum(w_r l_r) / sum(w_r) over the kept rows.
        ignore_index: target value to skip.
        sample_weight: None, or a weight per target (shaped like target, floating, finite, >= 0;
            on a GPU a bad weight is a device-side assert). A weight that requires grad gets its
            gradient (the rows' losses come from the kernels, the weighting is torch's).
        backend: "auto" (the first available for the tensor's device: triton, else cuda, else
            reference on a GPU; cpp, else reference on the CPU), "triton", "cuda", "cpp" or "reference".
            A named backend never falls back: it raises if it cannot run.

    Raises:
        ValueError: a bad dtype, shape, device, hyper-parameter, reduction, ignore_index,
            sample_weight or backend, naming it and the value.
        IndexError: drainage_idx out of range, or a target out of [0, K) or equal to drainage_idx
            (on GPU a device-side assert, so the host never waits).
        RuntimeError: the named backend cannot run on the logits' device; or a second-order use
            (create_graph=True through the loss, torch.func.grad / vmap): the backward is
            first-order only, use the matching *_loss_reference for those.
"""


def fused_drainage_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float | None = None,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
    backend: str = "auto",
    _fuse_grad: bool = True,
) -> torch.Tensor:
    """Drainage loss (Taha et al., CVPR 2026) with a fused softmax and a hand-written backward.

    l = log(1 + alpha * (p_d + p_J) / p_t + beta * p_J / p_d), p = softmax(logits) over all K
    outputs, t the target, d the drainage output, J every other output. alpha, beta > 0; beta
    defaults to 1 / alpha (ZKI-PH-ImageAnalysis/Drainage, loss.py). _fuse_grad (private): False
    measures the recompute pass structure (benchmarks, tests).
    """
    return family_loss(
        Member.DRAINAGE,
        drainage_params(alpha, beta),
        logits,
        target,
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
        backend=backend,
        _fuse_grad=_fuse_grad,
    )


def fused_gamblers_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    reward: float,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
    backend: str = "auto",
    _fuse_grad: bool = True,
) -> torch.Tensor:
    """Deep Gamblers loss (Liu et al., NeurIPS 2019): l = -log(p_t + p_d / reward), reward > 1, p the
    softmax over all K outputs and d the abstain ("reservation") output.

    As the official code (Z-T-WANG/NIPS2019DeepGamblers, main.py at 0d1b595611a8, train():
    -log(gain + reservation / reward)), computed in log space: log1p of a ratio of probabilities,
    precise at any logit scale. Its pre-training epochs use fused_cross_entropy_loss(over="classes").
    """
    return family_loss(
        Member.GAMBLERS,
        gamblers_params(reward),
        logits,
        target,
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
        backend=backend,
        _fuse_grad=_fuse_grad,
    )


def fused_dac_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
    backend: str = "auto",
    _fuse_grad: bool = True,
) -> torch.Tensor:
    """Deep Abstaining Classifier loss (Thulasidasan et al., ICML 2019), for label noise:
    l = (1 - p_d) CE_C - alpha log(1 - p_d), alpha >= 0, CE_C the cross-entropy over the C classes.

    As the official code (thulas/dac-label-noise, dac_loss.py at 03f9ec6748bd), except that it
    clamps p_d at 1 - 1e-7 before log(1 - p_d), while here log(1 - p_d) = logaddexp(z_t, lse_J) - LSE
    is exact in log space: the two differ only for rows with p_d > 1 - 1e-7, where the clamped loss
    stops growing (and its gradient through p_d is 0). alpha is a runtime argument: the harness's
    schedule changes it every epoch without recompiling anything. Its warm-up uses
    fused_cross_entropy_loss(over="all").
    """
    return family_loss(
        Member.DAC,
        dac_params(alpha),
        logits,
        target,
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
        backend=backend,
        _fuse_grad=_fuse_grad,
    )


def fused_cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    over: str = "all",
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
    backend: str = "auto",
    _fuse_grad: bool = True,
) -> torch.Tensor:
    """Cross-entropy through the family's fused kernel: over="all" K outputs (F.cross_entropy, DAC's
    warm-up) or over the C "classes", the drainage output left out (Deep Gamblers' pre-training),
    so that a warm-up runs the same fused path at the same speed."""
    return family_loss(
        ce_member(over),
        (0.0, 0.0),
        logits,
        target,
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
        backend=backend,
        _fuse_grad=_fuse_grad,
    )


for _loss in (fused_drainage_loss, fused_gamblers_loss, fused_dac_loss, fused_cross_entropy_loss):
    _loss.__doc__ += _ARGS_DOC


class _FamilyLoss(torch.nn.Module):
    """Module form of a fused_* loss: its hyper-parameters checked when the module is built."""

    _loss = staticmethod(fused_drainage_loss)

    def __init__(self, drainage_idx: int, reduction: str, ignore_index: int, backend: str, **params):
        super().__init__()
        check_options(reduction, ignore_index)
        if backend != "auto" and backend not in backends.NAMES:
            raise ValueError(f"backend must be 'auto' or one of {backends.NAMES}, got {backend!r}")
        self.params = params
        self.drainage_idx, self.reduction, self.ignore_index, self.backend = (
            drainage_idx,
            reduction,
            ignore_index,
            backend,
        )

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._loss(
            logits,
            target,
            **self.params,
            drainage_idx=self.drainage_idx,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            sample_weight=sample_weight,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return (
            f"{params}, drainage_idx={self.drainage_idx}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, backend={self.backend!r}"
        )


class DrainageLoss(_FamilyLoss):
    """Module form of fused_drainage_loss; arguments are checked when the module is built."""

    _loss = staticmethod(fused_drainage_loss)

    def __init__(
        self, alpha=1.0, beta=None, drainage_idx=-1, reduction="mean", ignore_index=-100, backend="auto"
    ):
        drainage_params(alpha, beta)
        super().__init__(drainage_idx, reduction, ignore_index, backend, alpha=alpha, beta=beta)

    @property
    def alpha(self):
        return self.params["alpha"]

    @property
    def beta(self):
        return self.params["beta"]


class GamblersLoss(_FamilyLoss):
    """Module form of fused_gamblers_loss."""

    _loss = staticmethod(fused_gamblers_loss)

    def __init__(self, reward, drainage_idx=-1, reduction="mean", ignore_index=-100, backend="auto"):
        gamblers_params(reward)
        super().__init__(drainage_idx, reduction, ignore_index, backend, reward=reward)


class DACLoss(_FamilyLoss):
    """Module form of fused_dac_loss. `alpha` is an attribute: set it as a schedule changes it."""

    _loss = staticmethod(fused_dac_loss)

    def __init__(self, alpha, drainage_idx=-1, reduction="mean", ignore_index=-100, backend="auto"):
        dac_params(alpha)
        super().__init__(drainage_idx, reduction, ignore_index, backend, alpha=alpha)

    @property
    def alpha(self):
        return self.params["alpha"]

    @alpha.setter
    def alpha(self, value):
        dac_params(value)
        self.params["alpha"] = value


class FusedCrossEntropyLoss(_FamilyLoss):
    """Module form of fused_cross_entropy_loss (over "all" outputs or the C "classes")."""

    _loss = staticmethod(fused_cross_entropy_loss)

    def __init__(self, over="all", drainage_idx=-1, reduction="mean", ignore_index=-100, backend="auto"):
        ce_member(over)
        super().__init__(drainage_idx, reduction, ignore_index, backend, over=over)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (any device), in the order "auto" tries them."""
    return [name for name in backends.NAMES if backends.availability(name)[0]]
