"""The cases that benchmarks/gpu_check.py runs under compute-sanitizer: every kernel of one GPU backend,
through the public API, at every row layout, on shapes small enough for the tools (they slow kernels
10-100x).

    python benchmarks/sanitize_cases.py --backend cuda                                 # on a GPU
    TRITON_INTERPRET=1 python benchmarks/sanitize_cases.py --backend triton --smoke    # the CPU

Each case runs the loss and its backward (torch.autograd.grad) and compares both with the float64
oracle: an access that stays inside an allocation but reads the wrong row is no sanitizer error, a
wrong number is. Prints one line a case, then DONE as the last line when every case passed. Exit
status 0 then, 1 when a case failed, 2 when the backend cannot run on the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py` from the root

import torch

from drainage_fast import backends, drainage_loss_reference, fused_drainage_loss

DONE = "sanitize_cases: every case passed"
BACKENDS = ("triton", "cuda")
IGNORE_INDEX = -100

# Row length K -> rows. Each K reaches a layout of the Triton forward (triton_launch._forward_config)
# and of the CUDA kernels (config_for in csrc/cuda/drainage_cuda.cu), named beside it. Odd K start
# rows off the 16-byte boundaries that the CUDA kernels read vectors on. The rows give each tile
# layout a partial last program, and each reduction several partials for the last program (Triton's
# ticket) or the CUDA finalize kernel to add.
ROWS = {
    11: 300,  # triton columns, a row a thread; cuda 4 lanes a row
    101: 37,  # triton tile, 8 rows a warp; cuda 4 lanes a row
    201: 37,  # triton tile, 4 rows a warp; cuda 8 lanes a row
    401: 37,  # triton tile, 2 rows a warp; cuda 16 lanes a row
    1001: 9,  # triton tile, a row a warp; cuda a warp a row
    3001: 5,  # triton tile, a row on 4 warps; cuda a block a row
    5000: 5,  # triton stream, 2 backward column tiles; cuda a block a row
    40001: 3,  # triton stream, 10 backward column tiles; cuda a block of 1024 threads a row
}
SMOKE_ROWS = 4  # --smoke: the interpreter runs every program in Python, one after the other
SMOKE_PIXELS = (2, 3)


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]  # (N, K) or per pixel (N, K, H, W)
    dtype: torch.dtype
    reduction: str
    upstream: float = 1.0  # mean / sum: the scalar gradient the backward gets; != 1 runs the scale kernel
    grad: bool = True  # False: the forward alone, under torch.no_grad (an evaluation)
    channels_last: bool = False
    ignored: str = ""  # "some": every third row's target is ignore_index; "all": every row's
    target_dtype: torch.dtype = torch.int64

    @property
    def name(self) -> str:
        dims = " × ".join(map(str, self.shape))
        dtype = {torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]
        parts = [dims, dtype, self.reduction]
        if len(self.shape) > 2:
            parts.append("channels_last" if self.channels_last else "NCHW")
        if self.reduction != "none" and self.grad:
            parts.append(f"upstream {self.upstream:g}")
        if not self.grad:
            parts.append("no grad")
        if self.ignored:
            parts.append(f"{self.ignored} ignored")
        if self.target_dtype != torch.int64:
            parts.append("int32 targets")
        return " ".join(parts)

    def smoke(self) -> Case:
        """The same K, layout and path with at most SMOKE_ROWS rows (NCHW: SMOKE_PIXELS pixels)."""
        N, K, *pixels = self.shape
        if pixels:
            return replace(self, shape=(min(N, 2), K, *SMOKE_PIXELS))
        return replace(self, shape=(min(N, SMOKE_ROWS), K))


def cases(smoke: bool = False) -> list[Case]:
    """Every layout with both dtypes: per K, reduction none (the forward writes the rows, the backward
    recomputes) in one dtype, and a mean or sum with its gradient written by the forward in the
    other; then what is not about K: per pixel, channels_last, ignored rows, an all-ignored mean, an
    evaluation and the stream layout's grid-stride loop."""
    bf16, fp32 = torch.bfloat16, torch.float32
    out = []
    for i, (K, rows) in enumerate(ROWS.items()):
        one, other = (fp32, bf16) if i % 2 == 0 else (bf16, fp32)
        out.append(Case((rows, K), one, "none"))
        out.append(Case((rows, K), other, *(("mean", 2.0) if i % 2 == 0 else ("sum", 0.5))))
    out += [
        Case((2, 51, 8, 9), bf16, "mean", 2.0),
        Case((2, 19, 8, 9), fp32, "none"),
        Case((2, 51, 8, 9), fp32, "none", channels_last=True),
        Case((2, 19, 8, 9), bf16, "sum", 0.5, channels_last=True),
        Case((37, 101), fp32, "mean", 2.0, ignored="some", target_dtype=torch.int32),
        Case((37, 1001), bf16, "none", ignored="some"),
        Case((8, 11), fp32, "mean", 2.0, ignored="all"),
        Case((37, 1001), bf16, "mean", grad=False),
        # more rows than the stream layout has programs (one per SM: 132 on an H100 / H200)
        Case((140, 5000), bf16, "mean", 2.0),
    ]
    return [c.smoke() for c in out] if smoke else out


def inputs(case: Case, device: torch.device, gen: torch.Generator):
    """(logits, target, upstream) on the device; targets never the drainage output (the last)."""
    N, K, *pixels = case.shape
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    logits = (torch.randn(case.shape, generator=gen) * 2).to(case.dtype).to(device, memory_format=fmt)
    target = torch.randint(0, K - 1, (N, *pixels), generator=gen)
    flat = target.view(-1)
    if case.ignored == "all":
        flat.fill_(IGNORE_INDEX)
    elif case.ignored == "some":
        flat[::3] = IGNORE_INDEX
    if case.reduction == "none":
        upstream = torch.rand(target.shape, generator=gen)  # one gradient a row
    else:
        upstream = torch.tensor(case.upstream)
    return logits, target.to(device, case.target_dtype), upstream.to(device)


def run_case(case: Case, backend: str, device: torch.device, gen: torch.Generator) -> None:
    """Raises AssertionError when the loss or the gradient is off the oracle's."""
    logits, target, upstream = inputs(case, device, gen)
    kwargs = {"reduction": case.reduction, "ignore_index": IGNORE_INDEX}
    exact = logits.detach().double().requires_grad_(case.grad)  # the same values, in float64
    with torch.set_grad_enabled(case.grad):
        loss = fused_drainage_loss(logits.requires_grad_(case.grad), target, backend=backend, **kwargs)
        ref = drainage_loss_reference(exact, target.long(), **kwargs)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-3, equal_nan=True)
    if not case.grad:
        return
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    if case.ignored == "all":  # the oracle's 0 / 0 mean has a nan gradient; the loss's is zero
        assert grad.abs().sum().item() == 0.0, "an all-ignored mean has a nonzero gradient"
        return
    (ref_grad,) = torch.autograd.grad(ref, exact, upstream.double())
    # one rounding to the gradient's dtype (bf16: 2^-8, 2^-7 in the interpreter), far above fp32 math
    tol = 2e-2 if case.dtype == torch.bfloat16 else 1e-4
    err = (grad.double() - ref_grad).abs().max().item()
    scale = ref_grad.abs().max().item()
    assert err <= tol * scale, f"gradient off the oracle by {err:.3g} (largest element {scale:.3g})"
    assert grad.dtype == logits.dtype and grad.stride() == logits.stride()


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=BACKENDS)
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto: cuda unless TRITON_INTERPRET=1")
    p.add_argument("--smoke", action="store_true", help=f"at most {SMOKE_ROWS} rows a case (the interpreter)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    ok, why = backends.availability(args.backend, device)
    if not ok:
        print(f"sanitize_cases: backend {args.backend} cannot run on {device}: {why}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)  # drawn on the CPU: the same inputs on every device
    todo = cases(args.smoke)
    failed = 0
    for case in todo:
        t0 = time.perf_counter()
        try:
            run_case(case, args.backend, device, gen)
            print(f"ok      {case.name}  {1e3 * (time.perf_counter() - t0):.0f} ms", flush=True)
        except Exception as err:  # noqa: BLE001 -- every case is wanted, and each failure named
            failed += 1
            print(f"FAILED  {case.name}: {type(err).__name__}: {str(err).strip()[:400]}", flush=True)
    if failed:
        print(f"sanitize_cases: {failed} of {len(todo)} cases failed", flush=True)
        return 1
    print(f"{DONE} ({len(todo)} cases, backend {args.backend}, {device})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
