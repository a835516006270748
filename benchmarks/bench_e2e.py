"""End-to-end share: one SGD training step with the fused loss vs the loss users write today.

    ResNet-50, bf16 autocast, channels_last, batch 256, 224 px, 51 outputs (mini-WebVision: 50 + drainage)
    the paper's 8-layer CIFAR CNN, batch 128, 32 px, 11 outputs (CIFAR-10: 10 + drainage)

extra_info gives images/s and the loss's share of the step: the time of the loss's forward + backward
alone on logits of the step's shape, over the step time. ResNet-50 at batch 256 needs a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
from naive_loss import naive_drainage_loss

from drainage_fast import fused_drainage_loss

STEPS = {
    "resnet50-b256-224px-K51": {
        "model": "resnet50",
        "batch": 256,
        "size": 224,
        "outputs": 51,
        "gpu_only": True,
    },
    "cnn8-b128-32px-K11": {"model": "cnn8", "batch": 128, "size": 32, "outputs": 11, "gpu_only": False},
}
LOSSES = {
    "fused": lambda logits, t: fused_drainage_loss(logits, t, alpha=0.1),
    "naive": lambda logits, t: naive_drainage_loss(logits, t, alpha=0.1),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, reps):
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("step_name", list(STEPS))
def test_train_step(benchmark, step_name, loss_name, device, machine):
    spec = STEPS[step_name]
    if spec["gpu_only"] and device.type != "cuda":
        pytest.skip(f"{step_name} needs a GPU (a step takes minutes on 2 CPU cores)")
    from train.models import build_model

    on_gpu = device.type == "cuda"
    fmt = torch.channels_last if on_gpu else torch.contiguous_format
    model = build_model(spec["model"], spec["outputs"]).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=device).contiguous(
        memory_format=fmt
    )
    target = torch.randint(0, spec["outputs"] - 1, (spec["batch"],), device=device)
    loss_fn = LOSSES[loss_name]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits = model(images)
        loss = loss_fn(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)

    for _ in range(3):
        step()
    # The loss alone, on logits of the step's shape and dtype.
    logits = torch.randn(
        spec["batch"],
        spec["outputs"],
        device=device,
        dtype=torch.bfloat16 if on_gpu else torch.float32,
        requires_grad=True,
    )
    loss_alone = _median_seconds(lambda: torch.autograd.grad(loss_fn(logits, target), logits), device, 50)
    step_time = _median_seconds(step, device, 10 if on_gpu else 3)

    benchmark.group = f"train-step-{step_name}"
    benchmark.extra_info.update(
        machine,
        step=step_name,
        loss=loss_name,
        images_per_s=spec["batch"] / step_time,
        loss_share=loss_alone / step_time,
        loss_us=loss_alone * 1e6,
    )
    benchmark.pedantic(step, rounds=10 if on_gpu else 3, warmup_rounds=1, iterations=1)
