"""Backend "triton": launchers for the kernels of triton_kernels.py.

Eager calls go straight to the launchers; under torch.compile the same launchers run behind two
opaque torch.library custom ops (drainage_fast::triton_forward / triton_backward) with fake
implementations, so Dynamo traces the loss without graph breaks. The op boundary is avoided in eager
mode because its dispatcher cost is several times the launch of a small kernel (QuACK measured
~60 us/call on an H100 for a similar op).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .._inputs import ROW_TERMS, TARGET_MESSAGE, Hyper, check_targets_torch, loss_dtype
from .triton_kernels import (
    _check_targets_kernel,
    _drainage_bwd_kernel,
    _drainage_fwd_kernel,
    _scale_grad_kernel,
)

NAME = "triton"
FUSED_GRAD = True  # forward_with_grad / scale_ exist: 1 read + 1 write for mean / sum

# Tile sizes, chosen so that no config spills registers on sm_80 / sm_90 (tests/kernel_resources.py
# compiles every config the launchers can issue and reads the registers from the cubin).
# Rows of up to MAX_TILE_K outputs are held in registers, so the forward reads them once; longer rows
# are streamed in LOOP_BLOCK_K tiles with an online log-sum-exp. Short rows are packed several to a
# program, at most ROWS_PER_THREAD rows of per-row math per thread: the row math is replicated
# across the threads that share a row, and 8+ rows per thread took 255 registers and spilled.
# fp64 values take two registers, so fp64 tiles hold half as many elements per thread.
MAX_TILE_K = 8192
LOOP_BLOCK_K = 4096
BWD_BLOCK_K = 4096
ELEMS_PER_THREAD = 32
ROWS_PER_THREAD = 4


class _Config(NamedTuple):
    block_rows: int
    block_k: int
    single_tile: bool
    num_warps: int


def _tile_config(block_k: int, single_tile: bool, wide: bool) -> _Config:
    """Rows per program and warps for tiles of block_k columns (wide: fp64 values)."""
    per_thread = ELEMS_PER_THREAD // (2 if wide else 1)
    num_warps = min(8, max(4, block_k // (32 * per_thread)))
    threads = 32 * num_warps
    # Triton lays a tile's threads, then its warps, along K first: threads that share a row.
    lanes_per_row = min(block_k, threads)
    rows_in_one_pass = max(1, threads // lanes_per_row)
    by_elems = max(1, threads * per_thread // block_k)
    block_rows = min(by_elems, rows_in_one_pass * (ROWS_PER_THREAD // (2 if wide else 1)))
    return _Config(triton.next_power_of_2(block_rows), block_k, single_tile, num_warps)


def _max_registers(num_warps: int) -> int:
    """ptxas's register cap: room for two programs per SM (255 at 4 warps, 128 at 8).

    Without a cap ptxas picks its own target for occupancy and, at 72-80 registers, spilled a
    long-lived value to stay under it (sm_80, fp32 K=5 and fp64 K=1001 forwards); with a cap it
    uses the registers it needs. The cap is a launch option, so every launch passes it.
    """
    return min(255, 65536 // (2 * 32 * num_warps))


def _forward_config(K: int, dtype: torch.dtype) -> _Config:
    wide = dtype == torch.float64
    # fp64 halves the tiles: a 1x8192 fp64 forward took 248 registers, its loop with 8 warps spilled.
    if K <= MAX_TILE_K // (2 if wide else 1):
        return _tile_config(triton.next_power_of_2(K), True, wide)
    return _tile_config(LOOP_BLOCK_K // (2 if wide else 1), False, wide)


def _backward_config(K: int, dtype: torch.dtype) -> _Config:
    block_k = min(triton.next_power_of_2(K), BWD_BLOCK_K)
    return _tile_config(block_k, K <= block_k, dtype == torch.float64)


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _hi_lo(value: float) -> tuple[float, float]:
    """value = hi + lo with hi exact in fp32 (Triton passes Python floats as fp32)."""
    hi = float(np.float32(value))
    return hi, value - hi


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _scale_grid_cap(device: torch.device) -> int:
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 64


def availability(device: torch.device | None = None) -> tuple[bool, str]:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")
    if device.type == "cuda":
        return True, f"triton {triton.__version__} on CUDA"
    if device.type == "cpu" and interpret:
        return True, "TRITON_INTERPRET=1: kernels run in the numpy interpreter (slow; for tests)"
    return False, (
        f"triton kernels need CUDA tensors (got {device.type}); on the CPU they run only in the "
        "interpreter, TRITON_INTERPRET=1 set before the first import of triton"
    )


def _launch_forward(x3, target, hp: Hyper, grad3=None, scale=None):
    N, S, K = x3.shape
    R = N * S
    loss = torch.empty(R, dtype=loss_dtype(x3), device=x3.device)
    stats = torch.empty(ROW_TERMS, R, dtype=loss.dtype, device=x3.device)
    if R == 0:
        return loss, stats
    cfg = _forward_config(K, x3.dtype)
    with _device_guard(x3):
        _drainage_fwd_kernel[(triton.cdiv(R, cfg.block_rows),)](
            x3, target, loss, stats, grad3, scale,
            R, K, S,
            *x3.stride(), target.stride(0),
            *(grad3.stride() if grad3 is not None else (0, 0, 0)),
            hp.drainage_idx, hp.ignore_index, *_hi_lo(hp.log_alpha), *_hi_lo(hp.log_beta),
            BLOCK_ROWS=cfg.block_rows, BLOCK_K=cfg.block_k, SINGLE_TILE=cfg.single_tile,
            WRITE_GRAD=grad3 is not None, SCALED=scale is not None,
            COMPUTE=_compute_dtype(x3.dtype), num_warps=cfg.num_warps, maxnreg=_max_registers(cfg.num_warps),
        )
    return loss, stats


def _launch_backward(x3, target, stats, grad_rows, hp: Hyper):
    N, S, K = x3.shape
    R = N * S
    grad3 = torch.empty_like(x3)  # keeps a dense input's layout (e.g. channels_last)
    if R == 0:
        return grad3
    cfg = _backward_config(K, x3.dtype)
    with _device_guard(x3):
        _drainage_bwd_kernel[(triton.cdiv(R, cfg.block_rows), triton.cdiv(K, cfg.block_k))](
            x3, target, stats, grad_rows, grad3,
            R, K, S,
            *x3.stride(), target.stride(0), grad_rows.stride(0),
            *grad3.stride(),
            hp.drainage_idx, hp.ignore_index,
            BLOCK_ROWS=cfg.block_rows, BLOCK_K=cfg.block_k,
            COMPUTE=_compute_dtype(x3.dtype), num_warps=cfg.num_warps, maxnreg=_max_registers(cfg.num_warps),
        )
    return grad3


def forward(x3: torch.Tensor, target: torch.Tensor, hp: Hyper) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, K) logits view, (R,) targets -> per-row loss (R,) and row terms (4, R)."""
    if torch.compiler.is_compiling():
        return torch.ops.drainage_fast.triton_forward(x3, target, *hp)
    return _launch_forward(x3, target, hp)


def backward(x3, target, stats, grad_rows, hp: Hyper) -> torch.Tensor:
    """Gradient (N, S, K) of sum_r grad_rows[r] * loss[r]; grad_rows may have any stride, 0 too."""
    if torch.compiler.is_compiling():
        return torch.ops.drainage_fast.triton_backward(
            x3, target, stats, grad_rows, hp.drainage_idx, hp.ignore_index
        )
    return _launch_backward(x3, target, stats, grad_rows, hp)


def forward_with_grad(x3, target, hp: Hyper, scale: torch.Tensor | None):
    """Forward that also writes the gradient of the summed loss, times `scale` (a one-element
    tensor of the loss dtype, 1 / count for a mean; None: 1).

    One read and one write of the logits for the whole forward + backward. Eager mode only (the
    caller hands the buffer out once, see _function.py).
    """
    grad3 = torch.empty_like(x3)
    loss, stats = _launch_forward(x3, target, hp, grad3=grad3, scale=scale)
    return loss, stats, grad3


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (a one-element tensor) in place, skipped on the device when scale == 1."""
    numel = grad.numel()
    if numel == 0:
        return grad
    # grad comes from empty_like: dense, so its numel elements fill one contiguous span.
    block = 4096
    grid = (min(triton.cdiv(numel, block), _scale_grid_cap(grad.device)),)
    with _device_guard(grad):
        _scale_grad_kernel[grid](
            grad, scale, numel, BLOCK=block, COMPUTE=_compute_dtype(grad.dtype), maxnreg=_max_registers(4)
        )
    return grad


def check_targets(target: torch.Tensor, K: int, hp: Hyper) -> torch.Tensor:
    """Device-side check of the (R,) targets without a host sync; returns the kept-target count.

    4 launches (zeros, the check kernel, ==, the assert) instead of ~12 for the same check and count
    in torch ops. A bad target fails the device-side assert, which surfaces at the next sync.
    """
    if torch.compiler.is_compiling():
        return check_targets_torch(target, K, hp)
    counts = torch.zeros(2, dtype=torch.int32, device=target.device)
    n = target.numel()
    if n:
        block = 4096
        with _device_guard(target):
            _check_targets_kernel[(triton.cdiv(n, block),)](
                target, counts, n, target.stride(0), K, hp.drainage_idx, hp.ignore_index, BLOCK=block,
                maxnreg=_max_registers(4),
            )
    torch._assert_async(counts[0] == 0, TARGET_MESSAGE)
    return counts[1]


@torch.library.custom_op("drainage_fast::triton_forward", mutates_args=())
def _forward_op(
    x3: torch.Tensor, target: torch.Tensor, log_alpha: float, log_beta: float,
    drainage_idx: int, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(x3, target, Hyper(log_alpha, log_beta, drainage_idx, ignore_index))


@_forward_op.register_fake
def _(x3, target, log_alpha, log_beta, drainage_idx, ignore_index):
    R = x3.shape[0] * x3.shape[1]
    return x3.new_empty(R, dtype=loss_dtype(x3)), x3.new_empty((ROW_TERMS, R), dtype=loss_dtype(x3))


@torch.library.custom_op("drainage_fast::triton_backward", mutates_args=())
def _backward_op(
    x3: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, grad_rows: torch.Tensor,
    drainage_idx: int, ignore_index: int,
) -> torch.Tensor:
    hp = Hyper(0.0, 0.0, drainage_idx, ignore_index)  # the backward needs no alpha / beta
    return _launch_backward(x3, target, stats, grad_rows, hp)


@_backward_op.register_fake
def _(x3, target, stats, grad_rows, drainage_idx, ignore_index):
    return torch.empty_like(x3)
