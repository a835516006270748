"""Public API: fused_drainage_loss, DrainageLoss, available_backends."""

from __future__ import annotations

import torch

from . import backends
from ._function import HIGHER_ORDER_MESSAGE, DrainageFunction
from ._inputs import check_hyper, check_inputs, check_target_values

# The backends of csrc/: their eager mean / sum is one op with a C++ autograd node.
NATIVE = ("cpp", "cuda")


def fused_drainage_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float | None = None,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    _fuse_grad: bool = True,
) -> torch.Tensor:
    """Drainage loss (Taha et al., CVPR 2026) with a fused softmax and a hand-written backward.

    l = log(1 + alpha * (p_d + p_J) / p_t + beta * p_J / p_d), p = softmax(logits) over all K
    outputs, t the target, d the drainage output, J every other output.

    Args:
        logits: (N, K) or (N, K, d1, ..., dk), float16 / bfloat16 / float32 / float64, any strides;
            K = C classes + 1 drainage output. Math runs in float32 (float64 for float64 input);
            the gradient has the dtype of the logits.
        target: (N,) or (N, d1, ..., dk) int64 or int32 class indices in [0, K), never
            drainage_idx; entries equal to ignore_index give 0 loss and 0 gradient.
        alpha, beta: > 0; beta defaults to 1 / alpha.
        drainage_idx: index of the drainage output in dim 1; negative counts from the end.
        reduction: "none" -> (N, d1, ..., dk) float32 losses (float64 for float64 input);
            "sum"; "mean" over the non-ignored targets (nan when all are ignored).
        ignore_index: target value to skip.
        backend: "auto" (the first available for the tensor's device: triton, else cuda, else
            reference on a GPU; cpp, else reference on the CPU), "triton", "cuda", "cpp" or "reference".
            A named backend never falls back: it raises if it cannot run.
        _fuse_grad: private; False measures the recompute pass structure (benchmarks, tests).

    Raises:
        ValueError: a bad dtype, shape, device, alpha, beta, reduction, ignore_index or backend.
        IndexError: drainage_idx out of range, or a target out of [0, K) or equal to drainage_idx
            (on GPU a device-side assert, so the host never waits).
        RuntimeError: the named backend cannot run on the logits' device; or a second-order use
            (create_graph=True through the loss, torch.func.grad / vmap): the backward is
            first-order only, use drainage_loss_reference for those.
    """
    hp = check_inputs(
        logits,
        target,
        alpha=alpha,
        beta=beta,
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        check_targets=False,
    )
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(logits):
        raise RuntimeError(HIGHER_ORDER_MESSAGE)  # torch.func.grad / vmap / jacrev: see the message
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
        return impl.reduced_loss(logits, target, hp, reduction == "mean")
    if impl.NAME != "triton":  # its targets kernel checks them, and raises the same error on the CPU
        check_target_values(target, logits.shape[1], hp.drainage_idx, hp.ignore_index)
    return DrainageFunction.apply(logits, target, hp, reduction, impl.NAME, fuse_grad, needs_grad)


class DrainageLoss(torch.nn.Module):
    """Module form of fused_drainage_loss; arguments are checked when the module is built."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float | None = None,
        drainage_idx: int = -1,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
    ):
        super().__init__()
        check_hyper(alpha, beta, reduction, ignore_index)
        if backend != "auto" and backend not in backends.NAMES:
            raise ValueError(f"backend must be 'auto' or one of {backends.NAMES}, got {backend!r}")
        self.alpha, self.beta, self.drainage_idx = alpha, beta, drainage_idx
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_drainage_loss(
            logits,
            target,
            alpha=self.alpha,
            beta=self.beta,
            drainage_idx=self.drainage_idx,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, drainage_idx={self.drainage_idx}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, backend={self.backend!r}"
        )


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (any device), in the order "auto" tries them."""
    return [name for name in backends.NAMES if backends.availability(name)[0]]
