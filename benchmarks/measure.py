"""Timing and profiling of one step, shared by bench_loss.py, gpu_check.py, gpu_resnet50_step.py and
the CPU scripts (cpu_samples, cpu_model).

`step(*inputs.next())` is one unit of work (providers.make_step); `inputs` is a cases.RotatingInputs
(`.next()` cycles through the copies in `.items`). Every function takes the device: on the CPU a time
is the wall clock, and what only CUDA has (kernel count, peak memory) is None; CUDA graphs raise.
Also what a run of many cells needs around each: a time cap, an error as one line, a clean device after.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import statistics
import subprocess
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CellTimeout(Exception):
    pass


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raises CellTimeout in the main thread after `seconds` (SIGALRM; checked between Python bytecodes)."""

    def expire(signum, frame):
        raise CellTimeout(f"over its {seconds:.0f} s time cap")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe(err: BaseException) -> str:
    """An error as one line of a report: its type and the start of its message."""
    return f"{type(err).__name__}: {str(err).strip()[:500]}"


def recover(device: torch.device) -> None:
    """After a failure: drain the device so the next cell starts clean (a sticky error stays sticky)."""
    with contextlib.suppress(Exception):
        sync(device)


def device_us(step, inputs, device: torch.device, reps: int) -> float:
    """Median time of one call in µs: CUDA events around it on a GPU (its GPU time, plus any gap in
    which the GPU waited for the host), the wall clock of a synchronised call on the CPU."""
    if device.type != "cuda":
        return wall_us(step, inputs, device, reps)
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


def wall_us(step, inputs, device: torch.device, reps: int) -> float:
    """Median wall-clock time of one call, synchronised before and after: what a loop that waits pays."""
    return _host_timed(step, inputs, device, reps, wait=True)


def host_us(step, inputs, device: torch.device, reps: int) -> float:
    """Median host time to issue one call (the Python + launch overhead; the GPU runs behind it)."""
    return _host_timed(step, inputs, device, reps, wait=False)


def _host_timed(step, inputs, device: torch.device, reps: int, wait: bool) -> float:
    times = []
    for _ in range(reps):
        args = inputs.next()
        sync(device)
        t0 = time.perf_counter()
        step(*args)
        if wait:
            sync(device)
        times.append((time.perf_counter() - t0) * 1e6)
    sync(device)
    return statistics.median(times)


def graph_us(step, inputs, device: torch.device, replays: int) -> float:
    """Median GPU time of one call replayed from a CUDA graph, in µs: no host work at all.

    One graph runs the step once on every input copy (so the inputs rotate as in eager timing) and
    the replay time is divided by the number of copies. Warm-up runs on a side stream before the
    capture, as https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs does. Raises whatever
    the capture raises (e.g. a provider that synchronises with the host).
    """
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for args in inputs.items:
            step(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [step(*args) for args in inputs.items]  # kept alive: the graph writes into them
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) * 1e3 / len(inputs.items))
    del graph, outputs
    return statistics.median(times)


def kernel_count(step, inputs, device: torch.device) -> int | None:
    """GPU kernels one call launches (memory copies and memsets not counted); None on the CPU, and
    None when the profiler saw nothing (CUPTI unavailable, e.g. without the rights in a container)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    args = inputs.next()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(*args)
        sync(device)
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return len(kernels) or None


def peak_memory_mb(step, inputs, device: torch.device) -> float | None:
    """Peak memory allocated during one call beyond what was allocated before it (inputs excluded;
    the outputs, e.g. the gradient, included); None on the CPU."""
    if device.type != "cuda":
        return None
    args = inputs.next()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(*args)
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def copy_bandwidth_gbps(device: torch.device, nbytes: int, reps: int) -> float:
    """Median device-to-device copy bandwidth in GB/s over bytes read + written (2 * nbytes per copy),
    the yardstick for "% of copy": a fused forward + backward moves the same 1 read + 1 write."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = device_us(lambda: dst.copy_(src), FixedInputs(), device, reps) / 1e6
    return 2 * src.numel() * 4 / seconds / 1e9


class FixedInputs:
    """The same arguments every call, for steps whose inputs are too big to need rotating."""

    def __init__(self, *args):
        self.items = [args]

    def next(self):
        return self.items[0]


def cpu_samples(steps: dict, repeats: int, sample_s: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call of each step (name -> callable), on the CPU: `repeats` samples each, taken in
    turns (one of each per round), so that load from other processes falls on all of them alike.
    Each sample averages enough calls to last about sample_s; the first call is a warm-up."""

    def per_call(step, number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            step()
        return (time.perf_counter() - start) / number

    numbers = {}
    for name, step in steps.items():
        step()
        numbers[name] = max(1, round(sample_s / per_call(step, 1)))
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(per_call(step, numbers[name]))
    return samples


def cpu_model() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo, else platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.processor()
