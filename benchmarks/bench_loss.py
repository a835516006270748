"""Throughput of the drainage loss: every provider x shape x dtype x mode (see cases.py, providers.py).

Timing is host wall-clock as pytest-benchmark measures it, with a device synchronisation inside every
timed call; warm-up rounds keep compilation and autotuning out; inputs rotate so that large shapes are
not served from L2. extra_info records the explicit byte count, the copy bandwidth measured in the
same run, peak memory over the inputs, and on a GPU the device time (CUDA events), the host time of
one call (Python overhead) and the number of kernels launched.
"""

from __future__ import annotations

import time

import measure
from cases import RotatingInputs
from providers import make_step, providers_for

TARGET_SECONDS = 0.4  # timed time per case; rounds are derived from one measured call
REPS = 20


def test_loss(benchmark, provider, case, device, copy_bandwidth, machine):
    step = make_step(providers_for(device)[provider], case.mode)
    inputs = RotatingInputs(case, device, requires_grad=case.mode != "fwd")

    def timed():
        step(*inputs.next())
        measure.sync(device)

    for _ in range(3):  # JIT compilation, autotuning, torch.compile, allocator warm-up
        timed()
    t0 = time.perf_counter()
    timed()
    one = time.perf_counter() - t0
    rounds = int(min(200, max(5, TARGET_SECONDS / max(one, 1e-6))))

    info = dict(
        machine,
        provider=provider,
        N=case.N,
        K=case.K,
        dtype=str(case.dtype),
        mode=case.mode,
        bytes=case.bytes(),
        copy_GBps=copy_bandwidth,
    )
    if device.type == "cuda":
        info.update(
            device_us=measure.device_us(step, inputs, device, REPS),
            host_us=measure.host_us(step, inputs, device, REPS),
            kernels=measure.kernel_count(step, inputs, device),
            peak_mem_MB=measure.peak_memory_mb(step, inputs, device),
        )
    benchmark.group = case.group
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
