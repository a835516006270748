"""Host time of one eager training call of the loss, measured without a GPU.

    python -m benchmarks.host_overhead [--out benchmarks/results/host_overhead]

On a GPU the host time of a small step is the whole step: at (256, 51) the kernels take a few
microseconds. This measures what the host does per call, on CPU tensors:

  * drainage_fast (triton): fused_drainage_loss(...).backward() with Triton's own JIT path up to the
    launch (argument binding, specialisation key, cache lookup); only the driver's launch call itself
    is skipped, as in the compile check (tests/kernel_resources.py), with a stand-in driver that
    names an sm_90 target. So it is our Python layer plus Triton's launcher Python.
  * F.cross_entropy on the same CPU logits (fp32): its host path and its CPU kernels. Its kernels
    are included (the host time of the GPU call cannot be separated from them here), so the
    baseline is generous: at or below it, the loss's host time is at most F.cross_entropy's.

  * drainage_fast (cpp) on the same CPU logits (fp32), kernels included: the host path of the
    native backends, one op whose C++ autograd node calls the device's kernels through the
    dispatcher (csrc/reduced_loss.cpp). The "cuda" backend runs this same Python and C++ on a GPU;
    only the kernels differ (3 launches there).

All are interleaved in one run (medians of repeated samples), so machine load affects them alike.
The driver's own launch call (a few microseconds per launch on a GPU) is not in either number:
drainage_fast makes 3 launches per step, F.cross_entropy about 5 (log_softmax, nll_loss, their two
backwards, and the ones_like of the upstream gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

from benchmarks import measure


def _fake_gpu_driver():
    """Triton's JIT up to the launch, for an sm_90 target, without a GPU (the compile check's driver)."""
    from triton.runtime.jit import JITFunction

    from tests.kernel_resources import use_target_only_driver

    use_target_only_driver(90)
    run = JITFunction.run

    def bind_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)  # everything up to the launch

    JITFunction.run = bind_only


def host_time(N: int = 256, K: int = 51, samples: int = 30, calls_s: float = 0.05) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    _fake_gpu_driver()
    import torch
    import torch.nn.functional as F

    from drainage_fast import api, fused_drainage_loss
    from drainage_fast.backends import triton_launch

    # CPU tensors stand in for CUDA ones: let the triton backend take them, and skip the host-side
    # target check that only CPU tensors get (on a GPU the targets kernel does it).
    triton_launch.availability = lambda device=None: (True, "bind-only")
    api.check_target_values = lambda *args: None

    torch.set_num_threads(1)  # the CPU kernels of the baseline: no thread pool to wait for
    x = torch.randn(N, K, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, K - 1, (N,))
    x_ce = torch.randn(N, K, requires_grad=True)

    def drainage_step():
        x.grad = None
        fused_drainage_loss(x, target, backend="triton").backward()

    def cross_entropy_step():
        x_ce.grad = None
        F.cross_entropy(x_ce, target).backward()

    x_native = x_ce.detach().clone().requires_grad_()

    def native_step():
        x_native.grad = None
        fused_drainage_loss(x_native, target, backend="cpp").backward()

    steps = {
        "drainage_fast triton (bind, no launch)": drainage_step,
        "F.cross_entropy (CPU, kernels included)": cross_entropy_step,
        "drainage_fast cpp (CPU, kernels included)": native_step,
    }
    for step in steps.values():  # compiles the kernels (sm_90) and warms every cache
        for _ in range(20):
            step()
    times = measure.cpu_samples(steps, samples, sample_s=calls_s)
    medians = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    names = list(steps)
    return {
        "shape": [N, K],
        "dtype": "bfloat16",
        "host_us_median": medians,
        "ratio": medians[names[0]] / medians[names[1]],
        "native_ratio": medians[names[2]] / medians[names[1]],
        "samples": samples,
        "seconds_per_sample": calls_s,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    parser.add_argument("--samples", type=int, default=30, help="interleaved samples per provider")
    args = parser.parse_args()
    result = host_time(samples=args.samples)
    lines = [
        f"# Host time per eager fwd+bwd call, {tuple(result['shape'])} {result['dtype']}, no GPU",
        "",
        "| provider | host µs per call (median) |",
        "|---|---:|",
        *(f"| {name} | {us:.1f} |" for name, us in result["host_us_median"].items()),
        "",
        f"Ratio drainage_fast triton / F.cross_entropy: {result['ratio']:.2f}; drainage_fast cpp / "
        f"F.cross_entropy: {result['native_ratio']:.2f} (the host path of the cuda backend, CPU kernels "
        f"included on both sides). Machine: {result['machine']}.",
        "Measured by benchmarks/host_overhead.py (see its docstring for what each number includes).",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
