"""torch.compile(fullgraph=True) traces the loss, forward and backward, with every backend.

Without a GPU the Triton path runs in the interpreter behind its torch.library custom ops, compiled by
Inductor for the CPU; the values must equal eager ones.
"""

import pytest
import torch

from drainage_fast import fused_drainage_loss
from support import BACKENDS, DEVICE, random_targets


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def step(model, x, target, backend, reduction):
    logits = model(x)
    loss = fused_drainage_loss(logits, target, alpha=0.1, reduction=reduction, backend=backend)
    return loss if reduction != "none" else (loss * torch.linspace(0.5, 1.5, len(loss), device=loss.device)).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_forward_and_backward_match_eager(backend, reduction):
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 11)).to(DEVICE)
    x = torch.randn(24, 6, device=DEVICE)
    target = random_targets(24, 11, -1)
    target[5] = -100

    eager = step(model, x, target, backend, reduction)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: any graph break is an error
    loss = compiled(model, x, target, backend, reduction)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_with_dynamic_batch_size(backend):
    fn = torch.compile(
        lambda x, t: fused_drainage_loss(x, t, reduction="sum", backend=backend), fullgraph=True, dynamic=True
    )
    for N in (5, 9):
        x = torch.randn(N, 7, device=DEVICE, requires_grad=True)
        t = random_targets(N, 7, -1)
        fn(x, t).backward()
        x_ref = x.detach().clone().requires_grad_()
        fused_drainage_loss(x_ref, t, reduction="sum", backend=backend).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
