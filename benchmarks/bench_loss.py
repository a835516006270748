"""Throughput of the drainage loss: every provider x shape x dtype x mode (see cases.py, providers.py).

Timing is host wall-clock as pytest-benchmark measures it, with a device synchronisation inside every
timed call; warm-up rounds keep compilation and autotuning out; inputs rotate so that large shapes are
not served from L2. extra_info records the explicit byte count, the copy bandwidth measured in the
same run, peak memory over the inputs, and on a GPU the device time (CUDA events), the host time of
one call (Python overhead) and the number of kernels launched.
"""

from __future__ import annotations

import statistics
import time

import torch

from cases import RotatingInputs
from providers import make_step, providers_for

TARGET_SECONDS = 0.4  # timed time per case; rounds are derived from one measured call


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_us(step, inputs, device, reps=20):
    """Median CUDA-event time of one call, in microseconds."""
    times = []
    for _ in range(reps):
        args = inputs.next()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(*args)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _host_us(step, inputs, device, reps=20):
    """Median host time to issue one call (the Python + launch overhead; the GPU runs behind it)."""
    times = []
    for _ in range(reps):
        args = inputs.next()
        _sync(device)
        t0 = time.perf_counter()
        step(*args)
        times.append((time.perf_counter() - t0) * 1e6)
    _sync(device)
    return statistics.median(times)


def _kernel_count(step, inputs):
    from torch.profiler import ProfilerActivity, profile

    args = inputs.next()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _peak_memory_mb(step, inputs, device):
    """Peak memory allocated during one call beyond what was allocated before it (inputs excluded)."""
    args = inputs.next()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(*args)
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def test_loss(benchmark, provider, case, device, copy_bandwidth, machine):
    step = make_step(providers_for(device)[provider], case.mode)
    inputs = RotatingInputs(case, device, requires_grad=case.mode != "fwd")

    def timed():
        step(*inputs.next())
        _sync(device)

    for _ in range(3):  # JIT compilation, autotuning, torch.compile, allocator warm-up
        timed()
    t0 = time.perf_counter()
    timed()
    one = time.perf_counter() - t0
    rounds = int(min(200, max(5, TARGET_SECONDS / max(one, 1e-6))))

    info = dict(machine, provider=provider, N=case.N, K=case.K, dtype=str(case.dtype), mode=case.mode,
                bytes=case.bytes(), copy_GBps=copy_bandwidth)
    if device.type == "cuda":
        info.update(device_us=_device_us(step, inputs, device), host_us=_host_us(step, inputs, device),
                    kernels=_kernel_count(step, inputs), peak_mem_MB=_peak_memory_mb(step, inputs, device))
    benchmark.group = case.group
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
