"""The oracle itself: held against the paper's probability formula, cross-entropy and gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F
from support import random_targets

from drainage_fast import drainage_loss_reference

f64 = dict(dtype=torch.float64)


def paper_loss(logits, target, alpha, beta, d):
    """l = log(1 + alpha * (p_d + p_J) / p_t + beta * p_J / p_d), straight from probabilities."""
    p = logits.double().softmax(dim=1)
    p_t = p.gather(1, target.long()[:, None])[:, 0]
    p_d = p[:, d]
    in_J = torch.ones_like(p, dtype=torch.bool)
    in_J[torch.arange(len(p)), target.long()] = False
    in_J[:, d] = False
    p_J = (p * in_J).sum(1)  # summed over J, not 1 - p_t - p_d: no cancellation when J is small
    return torch.log(1 + alpha * (p_d + p_J) / p_t + beta * p_J / p_d)


# K = 2: J is empty (p_J = 0); 3: one J entry; 11, 101: the paper's CIFAR-10 / CIFAR-100 outputs.
@pytest.mark.parametrize("K", [2, 3, 11, 101])
@pytest.mark.parametrize("alpha, beta", [(1.0, None), (0.1, None), (0.01, 5.0)])
@pytest.mark.parametrize("drainage_idx", [0, -1, 1])
def test_matches_probability_formula(K, alpha, beta, drainage_idx):
    logits = torch.randn(64, K, **f64) * 2
    target = random_targets(64, K, drainage_idx, device="cpu")
    loss = drainage_loss_reference(
        logits, target, alpha=alpha, beta=beta, drainage_idx=drainage_idx, reduction="none"
    )
    expected = paper_loss(logits, target, alpha, 1 / alpha if beta is None else beta, drainage_idx % K)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)


def test_alpha_one_beta_to_zero_is_cross_entropy_over_K():
    logits = torch.randn(50, 12, **f64) * 3
    target = random_targets(50, 12, -1, device="cpu")
    loss = drainage_loss_reference(logits, target, alpha=1.0, beta=1e-30, reduction="none")
    torch.testing.assert_close(
        loss, F.cross_entropy(logits, target, reduction="none"), rtol=1e-12, atol=1e-14
    )


def test_row_gradients_sum_to_zero():
    logits = torch.randn(20, 7, **f64, requires_grad=True)
    target = random_targets(20, 7, -1, device="cpu")
    (
        drainage_loss_reference(logits, target, alpha=0.3, reduction="none") * torch.rand(20, **f64)
    ).sum().backward()
    torch.testing.assert_close(logits.grad.sum(1), torch.zeros(20, **f64), rtol=0, atol=1e-15)


def test_shift_invariance():
    logits = torch.randn(10, 9, **f64)
    target = random_targets(10, 9, 3, device="cpu")
    a = drainage_loss_reference(logits, target, drainage_idx=3, reduction="none")
    b = drainage_loss_reference(logits + 100.0, target, drainage_idx=3, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(3, 5), (3, 2), (2, 4, 3, 2)], ids=["NK", "K2", "NKHW"])
def test_gradcheck(shape, reduction):
    logits = torch.randn(*shape, **f64, requires_grad=True)
    target = random_targets(shape[0], shape[1], -1, *shape[2:], device="cpu")
    target.view(-1)[0] = -100  # one ignored row
    fn = lambda x: drainage_loss_reference(x, target, alpha=0.5, beta=2.0, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


def test_ignore_index_and_reductions():
    logits = torch.randn(6, 5, **f64, requires_grad=True)
    target = random_targets(6, 5, -1, device="cpu")
    target[[1, 4]] = 7  # ignore_index may be any value, even a valid class index elsewhere
    none = drainage_loss_reference(logits, target, ignore_index=7, reduction="none")
    assert none[1].item() == 0.0 and none[4].item() == 0.0
    total = drainage_loss_reference(logits, target, ignore_index=7, reduction="sum")
    mean = drainage_loss_reference(logits, target, ignore_index=7, reduction="mean")
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / 4)
    mean.backward()
    assert logits.grad[[1, 4]].abs().sum().item() == 0.0


def test_all_ignored_mean_is_nan_like_cross_entropy():
    logits = torch.randn(4, 5, **f64)
    target = torch.full((4,), -100)
    assert math.isnan(drainage_loss_reference(logits, target).item())
    assert math.isnan(F.cross_entropy(logits, target).item())
    assert drainage_loss_reference(logits, target, reduction="sum").item() == 0.0


def test_spatial_input_equals_flattened_rows():
    logits = torch.randn(2, 6, 3, 4, **f64)
    target = random_targets(2, 6, -1, 3, 4, device="cpu")
    spatial = drainage_loss_reference(logits, target, reduction="none")
    flat = drainage_loss_reference(logits.movedim(1, -1).reshape(-1, 6), target.reshape(-1), reduction="none")
    assert spatial.shape == (2, 3, 4)
    torch.testing.assert_close(spatial.reshape(-1), flat, rtol=0, atol=0)
