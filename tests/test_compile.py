"""torch.compile(fullgraph=True) traces the loss, forward and backward, with every backend.

Without a GPU the Triton path runs in the interpreter behind its torch.library custom ops, compiled by
Inductor for the CPU; the values must equal eager ones.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import BACKENDS, DEVICE, random_targets

from drainage_fast import fused_drainage_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def step(model, x, target, backend, reduction):
    logits = model(x)
    loss = fused_drainage_loss(logits, target, alpha=0.1, reduction=reduction, backend=backend)
    return (
        loss
        if reduction != "none"
        else (loss * torch.linspace(0.5, 1.5, len(loss), device=loss.device)).sum()
    )


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


FIRST_CALL = """
import sys, torch
import drainage_fast

backend, device, member = sys.argv[1], sys.argv[2], sys.argv[3]
fused, oracle, params = {
    "drainage": ("fused_drainage_loss", "drainage_loss_reference", {"alpha": 0.5}),
    "gamblers": ("fused_gamblers_loss", "gamblers_loss_reference", {"reward": 2.5}),
    "dac": ("fused_dac_loss", "dac_loss_reference", {"alpha": 0.5}),
}[member]
fused, oracle = getattr(drainage_fast, fused), getattr(drainage_fast, oracle)
torch.manual_seed(0)
x = torch.randn(9, 7, device=device, requires_grad=True)
t = torch.randint(0, 6, (9,), device=device)
w = torch.rand(9, device=device)
fn = torch.compile(lambda x, t, w: fused(x, t, sample_weight=w, backend=backend, **params), fullgraph=True)
loss = fn(x, t, w)  # the very first call of the library in this process
loss.backward()
x64 = x.detach().double().requires_grad_()
ref = oracle(x64, t, sample_weight=w.double(), **params)
ref.backward()
torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
print("OK")
"""


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("member", ["drainage", "gamblers", "dac"])
def test_compiled_call_can_be_the_first_use_of_the_library(backend, member):
    """Dynamo cannot trace an import: the backend must be resolved (and imported) outside the trace.

    In a test process an earlier test has always loaded the backend, so this runs in a fresh one.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_CALL, backend, DEVICE.type, member],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]
