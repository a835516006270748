"""The environment part of benchmarks/gpu_check.py: what ran the check, what it can run, and how fast
it copies."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import measure
import torch
import triton_version

from drainage_fast import backends

COPY_BYTES = 2**30  # 1 GiB read + 1 GiB written: far beyond L2
COPY_REPS = 20
ENV_KEYS = (
    "device",
    "driver",
    "cuda_runtime",
    "nvcc",
    "compute_capability",
    "sm_count",
    "l2_MiB",
    "memory_GiB",
    "python",
    "torch",
    "triton",
    "liger_kernel",
    "cpu_count",
    *(f"backend_{name}" for name in backends.NAMES),
    "backends_ready_s",
    "copy_GBps",
)


def _tool_line(args: list[str], containing: str = "") -> str | None:
    """The first line of a tool's output that contains `containing`; None when the tool is absent or fails."""
    if shutil.which(args[0]) is None:
        return None
    try:
        run = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return next((line.strip() for line in run.stdout.splitlines() if containing in line), None)


def _nvcc() -> str | None:
    """nvcc's release line: the compiler that builds the CUDA extension (torch's CUDA_HOME first)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return _tool_line(
        [str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else "nvcc", "--version"], "release"
    )


def ready_backends(device: torch.device) -> dict:
    """Availability of every backend on `device`. The first ask builds the C++ / CUDA extension just in
    time (17-56 s for the CPU part on 2 cores, drainage_fast/_ext.py), outside any time cap: a build
    killed half-way leaves a lock that the next build waits on."""
    t0 = time.perf_counter()
    status = {}
    for name in backends.NAMES:
        ok, reason = backends.availability(name, device)
        status[f"backend_{name}"] = ("ok: " if ok else "unavailable: ") + reason
    return {**status, "backends_ready_s": round(time.perf_counter() - t0, 1)}


def environment(device: torch.device) -> dict:
    """ENV_KEYS -> value on this machine; building the extension (ready_backends) comes last."""
    props = torch.cuda.get_device_properties(device)
    values = dict.fromkeys(ENV_KEYS)
    values.update(
        device=props.name,
        driver=_tool_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]),
        cuda_runtime=torch.version.cuda,
        nvcc=_nvcc(),
        compute_capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        l2_MiB=getattr(props, "L2_cache_size", 0) / 2**20,
        memory_GiB=round(props.total_memory / 2**30, 1),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton_version.get(),
        liger_kernel=_version("liger_kernel"),
        cpu_count=os.cpu_count(),
        copy_GBps=copy_bandwidth(device),
    )
    values.update(ready_backends(device))
    return values


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy, bytes read + written (measure.copy_bandwidth_gbps)."""
    return measure.copy_bandwidth_gbps(device, COPY_BYTES, COPY_REPS)
