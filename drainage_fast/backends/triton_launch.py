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

from .._inputs import ROW_TERMS, Hyper, loss_dtype
from .triton_kernels import _drainage_bwd_kernel, _drainage_fwd_kernel, _scale_grad_kernel, _targets_kernel

NAME = "triton"
FUSED_GRAD = True  # forward_reduced(with_grad=True): 1 read + 1 write of the logits for mean / sum

# Layouts of the forward, by row length (tests/kernel_resources.py compiles every config the
# launchers can issue for sm_80 / sm_90 and reads registers, spills and instructions from the cubin):
#   COLUMNS (K <= COLUMNS_MAX_K): one row per thread. The row is read column by column (a row is at
#     most 32 elements, so a warp's rows share a few cache lines and the re-reads hit L1); the per-row
#     math (a dozen exp / log / log1p) runs once per row, not once per thread that shares the row.
#   TILE (K <= MAX_TILE_K): a [rows, BLOCK_K] tile in registers. Up to 1024 columns a program is one
#     warp, so the row math runs once per warp and row (Triton lays a tile's threads, then its warps,
#     along K, and every thread that shares a row repeats its row math); longer rows take 1024
#     columns per warp. Up to ROWS_PER_TILE rows keep enough bytes in flight for short rows. A
#     1x8192 tile (8 warps, at most 128 registers) spilled 8 bytes: 4096 is the largest.
#   STREAM (longer rows): LOOP_BLOCK_K-wide tiles with an online log-sum-exp, then a second read for
#     the gradient. The grid is one program per SM, so the rows in flight (132 x 256 KB at K = 128k
#     bf16 on an H100) stay in L2 for that second read.
# Every program loops over row blocks (a grid-stride loop), so a reduction has few partials.
# fp64 values take two registers, so fp64 tiles hold half as many elements per thread.
COLUMNS, TILE, STREAM = 0, 1, 2
COLUMNS_MAX_K = 32
MAX_TILE_K = 4096
LOOP_BLOCK_K = 4096
BWD_BLOCK_K = 4096
ELEMS_PER_THREAD = 32
ROWS_PER_TILE = 8
PROGRAMS_PER_SM = 32  # programs of one warp; fewer for wider programs (see _grid)


class _Config(NamedTuple):
    block_rows: int
    block_k: int
    layout: int
    num_warps: int


def _max_registers(num_warps: int) -> int:
    """ptxas's register cap: room for two programs per SM (255 at 4 warps, 128 at 8).

    Without a cap ptxas picks its own target for occupancy and, at 72-80 registers, spilled a
    long-lived value to stay under it (sm_80, fp32 K=5 and fp64 K=1001 forwards); with a cap it
    uses the registers it needs. The cap is a launch option, so every launch passes it.
    """
    return min(255, 65536 // (2 * 32 * num_warps))


@functools.lru_cache(maxsize=None)  # host time: called on every launch
def _forward_config(K: int, dtype: torch.dtype) -> _Config:
    wide = dtype == torch.float64
    per_thread = ELEMS_PER_THREAD // (2 if wide else 1)
    block_k = triton.next_power_of_2(K)
    if block_k <= COLUMNS_MAX_K:
        return _Config(32 * 4, COLUMNS_MAX_K, COLUMNS, 4)  # the column loops run to K: one kernel
    # fp64 halves the tiles: a 1x8192 fp64 forward took 248 registers, its loop with 8 warps spilled.
    if block_k <= MAX_TILE_K // (2 if wide else 1):
        num_warps = max(1, block_k // (32 * per_thread))
        rows = max(1, min(ROWS_PER_TILE // (2 if wide else 1), 32 * per_thread * num_warps // block_k))
        return _Config(rows, block_k, TILE, num_warps)
    return _Config(1, LOOP_BLOCK_K // (2 if wide else 1), STREAM, 4)


@functools.lru_cache(maxsize=None)
def _backward_config(K: int, dtype: torch.dtype) -> _Config:
    """The backward is elementwise (no row math): [rows, block_k] tiles of 4 warps."""
    wide = dtype == torch.float64
    per_thread = ELEMS_PER_THREAD // (2 if wide else 1)
    block_k = min(triton.next_power_of_2(K), BWD_BLOCK_K)
    num_warps = min(8, max(4, block_k // (32 * per_thread)))
    threads = 32 * num_warps
    rows_in_one_pass = max(1, threads // min(block_k, threads))
    by_elems = max(1, threads * per_thread // block_k)
    block_rows = min(by_elems, rows_in_one_pass * (4 // (2 if wide else 1)))
    return _Config(triton.next_power_of_2(block_rows), block_k, TILE, num_warps)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a small grid, so that the tests run the grid-stride loops


def _grid(cfg: _Config, n_rows: int, device: torch.device) -> int:
    blocks = triton.cdiv(n_rows, cfg.block_rows)
    if cfg.layout == STREAM:
        return min(blocks, _sm_count(device))
    return min(blocks, _sm_count(device) * max(1, PROGRAMS_PER_SM // cfg.num_warps))


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=64)  # host time: one numpy conversion per distinct alpha / beta
def _hi_lo(value: float) -> tuple[float, float]:
    """value = hi + lo with hi exact in fp32 (Triton passes Python floats as fp32)."""
    hi = float(np.float32(value))
    return hi, value - hi


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's. Entering a device
    # context costs microseconds of host time: only when the devices differ.
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


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


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    """Two int32 zeros per (device, stream): the kept count and the last-program ticket.

    The forward's last program sets them back to zero, so one allocation (one fill) serves every
    later call on the stream: the calls on one stream run one after the other, so they never share
    it. (Two host threads issuing losses on the same stream at once would interleave their
    launches; torch's own multi-GPU paths give each device its own stream.)
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A CUDA graph records the fill with its kernels: each replay starts from zeros, and no
        # other graph or eager call shares this one (a cached tensor made during a capture would
        # hold whatever the memory held until the first replay).
        return torch.zeros(2, dtype=torch.int32, device=device)
    # The raw stream handle: no Stream object is built on every call.
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _WORKSPACES[key]


def _launch_targets(target: torch.Tensor, K: int, hp: Hyper, workspace: torch.Tensor, count: bool) -> None:
    n = target.numel()
    block = 4096
    with _device_guard(target):
        _targets_kernel[(triton.cdiv(n, block),)](
            target,
            workspace,
            n,
            target.stride(0),
            K,
            hp.drainage_idx,
            hp.ignore_index,
            COUNT=count,
            BLOCK=block,
            maxnreg=_max_registers(4),
        )


def _launch_forward(
    x3,
    target,
    hp: Hyper,
    *,
    rows=None,
    grad3=None,
    reduce=0,
    workspace=None,
    partials=None,
    out=None,
    inv=None,
):
    """The forward kernel; rows = (loss (R,), stats (4, R)) to write, grad3 the gradient to write,
    reduce 1 (sum) / 2 (mean) of the rows into out (0-dim) through `partials` (one per program,
    _grid), and 1 / count into inv."""
    N, S, K = x3.shape
    R = N * S
    cfg = _forward_config(K, x3.dtype)
    grid = _grid(cfg, R, x3.device)
    loss, stats = rows if rows is not None else (None, None)
    with _device_guard(x3):
        _drainage_fwd_kernel[(grid,)](
            x3,
            target,
            loss,
            stats,
            grad3,
            workspace,
            partials,
            out,
            inv,
            R,
            K,
            S,
            *x3.stride(),
            target.stride(0),
            *(grad3.stride() if grad3 is not None else (0, 0, 0)),
            hp.drainage_idx,
            hp.ignore_index,
            *_hi_lo(hp.log_alpha),
            *_hi_lo(hp.log_beta),
            BLOCK_ROWS=cfg.block_rows,
            BLOCK_K=cfg.block_k,
            LAYOUT=cfg.layout,
            WRITE_ROWS=rows is not None,
            WRITE_GRAD=grad3 is not None,
            REDUCE=reduce,
            COMPUTE=_compute_dtype(x3.dtype),
            num_warps=cfg.num_warps,
            maxnreg=_max_registers(cfg.num_warps),
        )


def _forward_rows(x3, target, hp: Hyper) -> tuple[torch.Tensor, torch.Tensor]:
    R = x3.shape[0] * x3.shape[1]
    loss = torch.empty(R, dtype=loss_dtype(x3), device=x3.device)
    stats = torch.empty(ROW_TERMS, R, dtype=loss.dtype, device=x3.device)
    if R:
        _launch_targets(target, x3.shape[-1], hp, None, count=False)  # the check alone
        _launch_forward(x3, target, hp, rows=(loss, stats))
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
            x3,
            target,
            stats,
            grad_rows,
            grad3,
            R,
            K,
            S,
            *x3.stride(),
            target.stride(0),
            grad_rows.stride(0),
            *grad3.stride(),
            hp.drainage_idx,
            hp.ignore_index,
            BLOCK_ROWS=cfg.block_rows,
            BLOCK_K=cfg.block_k,
            COMPUTE=_compute_dtype(x3.dtype),
            num_warps=cfg.num_warps,
            maxnreg=_max_registers(cfg.num_warps),
        )
    return grad3


def forward(x3: torch.Tensor, target: torch.Tensor, hp: Hyper) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, K) logits view, (R,) targets -> per-row loss (R,) and row terms (4, R)."""
    if torch.compiler.is_compiling():
        return torch.ops.drainage_fast.triton_forward(x3, target, *hp)
    return _forward_rows(x3, target, hp)


def backward(x3, target, stats, grad_rows, hp: Hyper) -> torch.Tensor:
    """Gradient (N, S, K) of sum_r grad_rows[r] * loss[r]; grad_rows may have any stride, 0 too."""
    if torch.compiler.is_compiling():
        return torch.ops.drainage_fast.triton_backward(
            x3, target, stats, grad_rows, hp.drainage_idx, hp.ignore_index
        )
    return _launch_backward(x3, target, stats, grad_rows, hp)


def forward_reduced(x3, target, hp: Hyper, mean: bool, with_grad: bool):
    """The sum or mean of the row losses, (1 / count for a mean), and with_grad the gradient of that
    reduced loss, written while each row is at hand: two launches (the targets kernel, the forward
    with its reduction) and one read of the logits. Eager mode only (see backends.Backend)."""
    R = x3.shape[0] * x3.shape[1]
    grad3 = torch.empty_like(x3) if with_grad else None
    dtype = loss_dtype(x3)
    # Separate buffers: the loss is handed to the user, who may modify it in place.
    out = torch.empty((), dtype=dtype, device=x3.device)
    inv = torch.empty(1, dtype=dtype, device=x3.device) if mean else None
    if R == 0:
        out.fill_(float("nan") if mean else 0.0)
        if mean:
            inv.fill_(float("inf"))
        if with_grad:
            grad3.zero_()
        return out, inv, grad3, None
    # Everything that can fail on the host comes before the targets kernel adds the count into the
    # workspace: the forward's allocation here, and its compilation, which the except undoes.
    partials = torch.empty(
        _grid(_forward_config(x3.shape[-1], x3.dtype), R, x3.device), dtype=dtype, device=x3.device
    )
    workspace = _workspace(x3.device)
    _launch_targets(target, x3.shape[-1], hp, workspace, count=mean)
    try:
        _launch_forward(
            x3,
            target,
            hp,
            grad3=grad3,
            reduce=2 if mean else 1,
            workspace=workspace,
            partials=partials,
            out=out,
            inv=inv,
        )
    except BaseException:  # also KeyboardInterrupt: the next call must find the workspace zeroed
        workspace.zero_()
        raise
    return out, inv, grad3, None


def scale_(grad: torch.Tensor, grad_out: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    """grad *= grad_out in place (pending is always None here: the forward applied 1 / count);
    one launch that reads nothing but the scalar when grad_out == 1."""
    if pending is not None:
        grad_out = grad_out * pending
    numel = grad.numel()
    if numel == 0:
        return grad
    # grad comes from empty_like: dense, so its numel elements fill one contiguous span.
    block = 4096
    grid = (min(triton.cdiv(numel, block), 8 * _sm_count(grad.device)),)
    with _device_guard(grad):
        _scale_grad_kernel[grid](
            grad, grad_out, numel, BLOCK=block, COMPUTE=_compute_dtype(grad.dtype), maxnreg=_max_registers(4)
        )
    return grad


@torch.library.custom_op("drainage_fast::triton_forward", mutates_args=())
def _forward_op(
    x3: torch.Tensor,
    target: torch.Tensor,
    log_alpha: float,
    log_beta: float,
    drainage_idx: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_rows(x3, target, Hyper(log_alpha, log_beta, drainage_idx, ignore_index))


@_forward_op.register_fake
def _(x3, target, log_alpha, log_beta, drainage_idx, ignore_index):
    R = x3.shape[0] * x3.shape[1]
    return x3.new_empty(R, dtype=loss_dtype(x3)), x3.new_empty((ROW_TERMS, R), dtype=loss_dtype(x3))


@torch.library.custom_op("drainage_fast::triton_backward", mutates_args=())
def _backward_op(
    x3: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    drainage_idx: int,
    ignore_index: int,
) -> torch.Tensor:
    hp = Hyper(0.0, 0.0, drainage_idx, ignore_index)  # the backward needs no alpha / beta
    return _launch_backward(x3, target, stats, grad_rows, hp)


@_backward_op.register_fake
def _(x3, target, stats, grad_rows, drainage_idx, ignore_index):
    return torch.empty_like(x3)
