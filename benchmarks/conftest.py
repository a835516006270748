"""pytest-benchmark configuration: which suite runs, the measured copy bandwidth, machine facts.

Run with an explicit file list, e.g. `python -m pytest benchmarks/bench_loss.py --benchmark-json=out.json`
(benchmarks/run.sh does everything). The suite is "gpu" when CUDA is present, else "cpu" (small
shapes, a few minutes on 2 cores); --suite overrides it.
"""

from __future__ import annotations

import platform

import cases as case_defs
import measure
import pytest
import torch
from providers import providers_for


def pytest_addoption(parser):
    parser.addoption(
        "--suite", default="auto", choices=["auto", "cpu", "gpu"], help="which shapes and device"
    )
    parser.addoption("--providers", default="", help="comma-separated provider names to keep (default: all)")


def suite_device(config) -> torch.device:
    suite = config.getoption("--suite")
    if suite == "auto":
        suite = "gpu" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda" if suite == "gpu" else "cpu")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = suite_device(metafunc.config)
    shapes = case_defs.GPU_SHAPES if device.type == "cuda" else case_defs.CPU_SHAPES
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    keep = {p for p in metafunc.config.getoption("--providers").split(",") if p}
    params, ids = [], []
    for provider in providers_for(device):
        if keep and provider not in keep:
            continue
        for (N, K), dtype, mode in ((s, d, m) for s in shapes for d in dtypes for m in case_defs.MODES):
            if provider == "reference-compiled" and device.type == "cpu" and mode != "fwd+bwd":
                continue  # Inductor's C++ build costs ~20 s per graph on 2 cores: one mode is enough
            if provider.endswith(",recompute]") and mode != "fwd+bwd":
                continue  # the pass structures differ only for mean/sum with a gradient
            case = case_defs.Case(N, K, dtype, mode)
            params.append((provider, case))
            ids.append(f"{case.group}-{provider}")
    metafunc.parametrize("provider, case", params, ids=ids)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return suite_device(request.config)


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """Measured copy bandwidth in GB/s (bytes read + written), the yardstick for '% of bandwidth'."""
    return measure.copy_bandwidth_gbps(device, 2**30 if device.type == "cuda" else 2**27, reps=10)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="session")
def machine(device) -> dict:
    import triton_version

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version.get(),
        "threads": torch.get_num_threads(),
    }
