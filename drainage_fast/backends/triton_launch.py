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
import threading
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .._inputs import ROW_TERMS, TARGET_MESSAGE, WEIGHT_MESSAGE, Hyper, check_target_values, loss_dtype
from . import triton_kernels as kernels
from .triton_kernels import _drainage_bwd_kernel, _drainage_fwd_kernel, _scale_grad_kernel, _targets_kernel

NAME = "triton"
FUSED_GRAD = True  # forward_reduced(with_grad=True): 1 read + 1 write of the logits for mean / sum

# Layouts of the forward, by row length (tests/kernel_resources.py compiles every config the
# launchers can issue for sm_80 / sm_90 and reads registers, spills, loads and layouts from it):
#   COLUMNS (K <= COLUMNS_MAX_K): one row per thread. The row is read column by column (a row is at
#     most 32 elements, so a warp's rows share a few cache lines and the re-reads hit L1); the per-row
#     math (a dozen exp / log / log1p) runs once per row, not once per thread that shares the row.
#   TILE (K <= MAX_TILE_K): a [rows, BLOCK_K] tile in registers. Up to 1024 columns a program is one
#     warp, so the row math runs once per warp and row (Triton lays a tile's threads, then its warps,
#     along K, and every thread that shares a row repeats its row math); longer rows take 1024
#     columns per warp. Up to ROWS_PER_TILE rows keep enough bytes in flight for short rows. A
#     1x8192 tile (8 warps, at most 128 registers) spilled 8 bytes: 4096 is the largest.
#   STREAM (longer rows): STREAM_TILE_BYTES-wide tiles with an online log-sum-exp, then a second read
#     for the gradient, by 16 warps: 4 loads of 16 bytes per thread, 32 KB a tile in flight on each
#     SM (an H200 needs about 4.8 TB/s x 700 ns / 132 SMs = 25 KB per SM by Little's law). The grid
#     is one program per SM, so the rows in flight (132 x 256 KB at K = 128k bf16) stay in L2 for
#     that second read.
# Rows side by side (SIDE_BY_SIDE: the outputs strided, consecutive rows adjacent: per-pixel NCHW
# logits, or transposed (N, K) ones) take COLUMNS at every K, in blocks of ROWS_PER_THREAD adjacent
# rows a thread: a column of a block is consecutive rows, so the lanes read consecutive pixels
# (threads along K, as in a tile, would each use one element of a 32-byte sector) and the row math
# runs once per row. (A [pixels, K] register tile was tried: Triton repeats the row math in every
# thread along K, 64 times over for bf16, and it spilled.) Other rows with strided outputs (STRIDED)
# take tiles of half the elements a thread: every element needs its own 64-bit address.
# Every program loops over row blocks (a grid-stride loop), so a reduction has few partials; the grid
# is one wave: the programs that fit on the device at once (_programs_per_sm).
# fp64 values take two registers, so fp64 tiles hold half as many elements per thread.
COLUMNS, TILE, STREAM = kernels.COLUMNS.value, kernels.TILE.value, kernels.STREAM.value
FLAT_ROWS, DIV_ROWS, PIXEL_ROWS = kernels.FLAT_ROWS.value, kernels.DIV_ROWS.value, kernels.PIXEL_ROWS.value
COLUMNS_MAX_K = 32
MAX_TILE_K = 4096
STREAM_TILE_BYTES = 32768
STREAM_WARPS = 16
BWD_BLOCK_K = 4096
ELEMS_PER_THREAD = 32
ROWS_PER_TILE = 8
ROWS_PER_THREAD = 4  # side-by-side rows: 16-byte loads of 4 fp32 pixels (kernels' PIXEL_VECTOR)
COLUMN_CHUNK = 8  # side-by-side rows: columns a step of the column loops
ALIGNED_MIN_K = 64  # unit-stride rows from this length on are read as aligned body + edges
SUM_BLOCK = 4096  # targets per program of the targets kernel
INTERPRETED_GRID = 4  # the interpreter runs programs one by one: few, so that the loops still loop
# Fixed by the hardware of sm_80 / sm_90 (the CUDA programming guide's table of compute capabilities).
MAX_PROGRAMS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 256  # registers are given to a warp in multiples of this
# How the rows of a logits view lie in memory (_row_kind).
CONTIGUOUS, SIDE_BY_SIDE, STRIDED = "contiguous", "side by side", "strided"


class _Config(NamedTuple):
    block_rows: int
    block_k: int
    layout: int
    num_warps: int
    side_by_side: bool = False  # blocks of adjacent rows (PIXEL_ROWS, or FLAT rows 1 apart)


def _max_registers(num_warps: int) -> int:
    """ptxas's register cap: room for two programs per SM (255 at 4 warps, 128 at 8), and for one
    program of 16 warps (128 registers).

    Without a cap ptxas picks its own target for occupancy and, at 72-80 registers, spilled a
    long-lived value to stay under it (sm_80, fp32 K=5 and fp64 K=1001 forwards); with a cap it
    uses the registers it needs. The cap is a launch option, so every launch passes it.
    """
    programs = 1 if num_warps >= 16 else 2
    return min(255, 65536 // (programs * 32 * num_warps))


# The compile options every launch pins, so that a new Triton version cannot change the bits:
# Triton 3.9 warns that the default of fp fusion (a * b + c as one FMA) changes in 3.10; the row
# terms and the gradient contain such products, and the results were validated with fusion on.
FP_FUSION = True


def _options(num_warps: int) -> dict:
    return {"num_warps": num_warps, "maxnreg": _max_registers(num_warps), "enable_fp_fusion": FP_FUSION}


def _row_kind(x3: torch.Tensor) -> str:
    """CONTIGUOUS: unit-stride outputs. SIDE_BY_SIDE: strided outputs, and consecutive rows adjacent
    (NCHW pixels, transposed logits). STRIDED: anything else."""
    N, S, K = x3.shape
    if x3.stride(2) == 1:
        return CONTIGUOUS
    if (S > 1 and x3.stride(1) == 1) or (S == 1 and x3.stride(0) == 1):
        return SIDE_BY_SIDE
    return STRIDED


def _per_thread(dtype: torch.dtype, kind: str) -> int:
    """Elements of a tile per thread: fp64 values take two registers, strided ones an address each."""
    return ELEMS_PER_THREAD // (2 if dtype == torch.float64 else 1) // (2 if kind == STRIDED else 1)


@functools.lru_cache(maxsize=None)  # host time: called on every launch
def _forward_config(K: int, dtype: torch.dtype, kind: str = CONTIGUOUS) -> _Config:
    """The forward's layout for rows of K outputs that lie as `kind` says (_row_kind)."""
    wide = dtype == torch.float64
    per_thread = _per_thread(dtype, kind)
    block_k = triton.next_power_of_2(K)
    if kind == SIDE_BY_SIDE:
        # COLUMN_CHUNK columns a step: that many loads in flight a thread (one: ~16 KB an SM).
        return _Config(
            32 * 4 * ROWS_PER_THREAD // (2 if wide else 1),
            COLUMN_CHUNK // (2 if wide else 1),
            COLUMNS,
            4,
            True,
        )
    if block_k <= COLUMNS_MAX_K:
        # One column a step (the columns loops run to K: one kernel): a warp's 32 short rows share
        # a few cache lines, and wider steps took 3x the registers (fp64 spilled).
        return _Config(32 * 4, 1, COLUMNS, 4)
    # fp64 halves the tiles: a 1x8192 fp64 forward took 248 registers, its loop with 8 warps spilled.
    if block_k <= MAX_TILE_K * per_thread // ELEMS_PER_THREAD:
        num_warps = max(1, block_k // (32 * per_thread))
        rows = max(
            1, min(ROWS_PER_TILE * per_thread // ELEMS_PER_THREAD, 32 * per_thread * num_warps // block_k)
        )
        return _Config(rows, block_k, TILE, num_warps)
    tile = STREAM_TILE_BYTES // dtype.itemsize * per_thread * (2 if wide else 1) // ELEMS_PER_THREAD
    return _Config(1, tile, STREAM, STREAM_WARPS)


@functools.lru_cache(maxsize=None)
def _backward_config(K: int, dtype: torch.dtype, kind: str = CONTIGUOUS) -> _Config:
    """The backward is elementwise (no row math): [rows, block_k] tiles of 4 to 8 warps. Rows side by
    side take [32, block_k] tiles of adjacent rows (4 warps), whose lanes Triton lays along the rows:
    with 16-byte vectors of rows a thread, 4 to 8 lanes cover 32 adjacent rows, whole sectors."""
    per_thread = _per_thread(dtype, kind)
    if kind == SIDE_BY_SIDE:
        return _Config(32, min(triton.next_power_of_2(K), 4 * per_thread), TILE, 4, True)
    block_k = min(triton.next_power_of_2(K), BWD_BLOCK_K)
    num_warps = min(8, max(4, block_k // (32 * per_thread)))
    threads = 32 * num_warps
    rows_in_one_pass = max(1, threads // min(block_k, threads))
    by_elems = max(1, threads * per_thread // block_k)
    block_rows = min(by_elems, rows_in_one_pass * 4 * per_thread // ELEMS_PER_THREAD)
    # At least 8 elements a thread: 16 bytes of bf16 (a tile of fewer issues narrower loads).
    block_rows = max(block_rows, threads * 8 // block_k)
    return _Config(triton.next_power_of_2(max(1, block_rows)), block_k, TILE, num_warps)


class _Rows(NamedTuple):
    """How the row blocks of one launch map to memory (the kernels' ROWS_MODE and its arguments)."""

    mode: int
    index32: bool  # rows and blocks below 2^31: 32-bit index arithmetic
    n_blocks: int
    blocks_per_image: int
    x_strides: tuple[int, int, int]  # (n, s, k); FLAT_ROWS: s is the row stride
    g_strides: tuple[int, int, int]
    aligned: bool  # unit-stride rows read as aligned body + edges
    same_offsets: bool  # the gradient has the logits' strides


def _row_stride(t3: torch.Tensor) -> int | None:
    """The stride between consecutive rows when they are evenly spaced (S = 1, or channels_last),
    else None."""
    N, S, _ = t3.shape
    if S == 1:
        return t3.stride(0)
    if N == 1 or t3.stride(0) == S * t3.stride(1):
        return t3.stride(1)
    return None


def _rows(x3: torch.Tensor, g3: torch.Tensor | None, cfg: _Config) -> _Rows:
    N, S, K = x3.shape
    R = N * S
    g = g3 if g3 is not None else x3
    same = g.stride() == x3.stride()
    aligned = cfg.layout != COLUMNS and K >= ALIGNED_MIN_K and x3.stride(2) == 1 and g.stride(2) == 1
    x_flat, g_flat = _row_stride(x3), _row_stride(g)
    if cfg.side_by_side and S > 1:
        per_image = triton.cdiv(S, cfg.block_rows)
        n_blocks = N * per_image
        return _Rows(PIXEL_ROWS, n_blocks < 2**31, n_blocks, per_image, x3.stride(), g.stride(), False, same)
    n_blocks = triton.cdiv(R, cfg.block_rows)
    if x_flat is not None and g_flat is not None:
        x_strides, g_strides = (0, x_flat, x3.stride(2)), (0, g_flat, g.stride(2))
        return _Rows(FLAT_ROWS, R < 2**31, n_blocks, 1, x_strides, g_strides, aligned, same)
    # R + BLOCK_ROWS: the last block's padding rows are indexed too.
    return _Rows(DIV_ROWS, R + cfg.block_rows < 2**31, n_blocks, 1, x3.stride(), g.stride(), aligned, same)


def _block_constexprs(cfg: _Config, plan: _Rows, x3: torch.Tensor) -> dict:
    """The constexprs of a block of rows that the forward and backward kernels share."""
    return dict(
        BLOCK_ROWS=cfg.block_rows,
        BLOCK_K=cfg.block_k,
        ROWS_MODE=plan.mode,
        INDEX32=plan.index32,
        ALIGNED=plan.aligned,
        SAME_OFFSETS=plan.same_offsets,
        V=16 // x3.element_size(),
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: see INTERPRETED_GRID


def programs_per_sm(
    registers: int,
    shared_bytes: int,
    num_warps: int,
    *,
    registers_per_sm: int = 65536,
    warps_per_sm: int = 64,
    shared_per_sm: int = 233472,
) -> int:
    """Programs of a compiled kernel that fit on one SM at once, as the hardware allots them: its
    registers (per warp, in units of 256), its shared memory (plus 1 KB the runtime reserves per
    block) and its warps; at least 1. The defaults are sm_90's (sm_80: 167936 bytes of shared
    memory)."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = (registers_per_sm // per_warp) // num_warps
    by_warps = warps_per_sm // num_warps
    by_shared = shared_per_sm // (shared_bytes + 1024) if shared_bytes else MAX_PROGRAMS_PER_SM
    return max(1, min(by_registers, by_warps, by_shared, MAX_PROGRAMS_PER_SM))


_OCCUPANCY: dict[tuple, int] = {}


def _occupancy(kernel, args: tuple, kwargs: dict, device: torch.device, key: tuple) -> int:
    """programs_per_sm of the kernel that these arguments compile to, read from the compiled kernel
    (registers, shared memory) before its first launch, once per key: the grid, and so the order of
    a reduction, is the same on every call."""
    if key not in _OCCUPANCY:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()  # loads the module: its register count comes from the driver
        props = torch.cuda.get_device_properties(device)
        _OCCUPANCY[key] = programs_per_sm(
            compiled.n_regs,
            compiled.metadata.shared,
            kwargs["num_warps"],
            registers_per_sm=props.regs_per_multiprocessor,
            warps_per_sm=props.max_threads_per_multi_processor // 32,
            shared_per_sm=props.shared_memory_per_multiprocessor,
        )
    return _OCCUPANCY[key]


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
# int64 [kept count, last-program ticket, bad targets, the targets kernel's ticket, bad weights]
# (triton_kernels.WS_*)
WORKSPACE_SLOTS = 5


def _workspace(device: torch.device) -> torch.Tensor:
    """The int64 workspace of (device, stream, host thread), zero between calls.

    The forward's last program sets it back to zero, so one allocation (one fill) serves every later
    call: the calls of one thread on one stream run one after the other, so they never share it. Two
    host threads on the same stream (threaded evaluation) would interleave their launches (targets
    1, targets 2, forward 1, forward 2: forward 1 would take both counts): each thread has its own.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A CUDA graph records the fill with its kernels: each replay starts from zeros, and no
        # other graph or eager call shares this one (a cached tensor made during a capture would
        # hold whatever the memory held until the first replay).
        return torch.zeros(WORKSPACE_SLOTS, dtype=torch.int64, device=device)
    # The raw stream handle: no Stream object is built on every call.
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream, threading.get_ident())
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.zeros(WORKSPACE_SLOTS, dtype=torch.int64, device=device)
    return _WORKSPACES[key]


def _launch_targets(
    target: torch.Tensor,
    K: int,
    hp: Hyper,
    workspace: torch.Tensor,
    count: bool,
    weight: torch.Tensor | None = None,
    weight_sum: torch.Tensor | None = None,
) -> None:
    """The targets kernel: the device-side check of every target (and sample weight; bad ones also
    counted into the workspace) and, with `count`, the divisor of a mean: the kept count into the
    workspace, or with weights the sum of the kept rows' weights into weight_sum (one element of the
    loss dtype)."""
    n = target.numel()
    programs = triton.cdiv(n, SUM_BLOCK)
    dtype = weight_sum.dtype if weight_sum is not None else torch.float32
    partials = (
        torch.empty(programs, dtype=dtype, device=target.device) if weight is not None and count else None
    )
    with _device_guard(target):
        _targets_kernel[(programs,)](
            target,
            weight,
            workspace,
            partials,
            weight_sum,
            n,
            target.stride(0),
            weight.stride(0) if weight is not None else 0,
            K,
            hp.drainage_idx,
            hp.ignore_index,
            COUNT=count,
            HAS_WEIGHT=weight is not None,
            BLOCK=SUM_BLOCK,
            COMPUTE=_compute_dtype(dtype),
            **_options(4),
        )
    if target.device.type == "cpu":
        _raise_on_bad_targets(target, K, hp, workspace)


def _raise_on_bad_targets(target: torch.Tensor, K: int, hp: Hyper, workspace: torch.Tensor) -> None:
    """The interpreter ignores device asserts: there the targets kernel's counts of bad targets and
    weights are read back (a CPU tensor; a GPU never waits for this) and raised as the errors the API
    gives on the host, naming the value. The API leaves this backend's CPU targets to its kernel, so
    this is the check that the tests of bad targets exercise."""
    counts = workspace.numpy()  # numpy: no dispatcher op (a GPU has no such read)
    bad_targets, bad_weights = counts[kernels.WS_BAD.value], counts[kernels.WS_BAD_WEIGHT.value]
    if bad_targets == 0 and bad_weights == 0:
        return
    workspace.zero_()
    if bad_targets:
        check_target_values(target, K, hp.drainage_idx, hp.ignore_index)  # raises, naming the value
        raise IndexError(
            f"{TARGET_MESSAGE} (the targets kernel found bad targets that the host check did not)"
        )
    raise ValueError(WEIGHT_MESSAGE)


def _prepare_forward(
    x3, target, hp: Hyper, rows, grad3, reduce, workspace, out, inv, weight=None, weight_sum=None
):
    """Everything of a forward launch that can fail on the host (the config, the compile, the
    partials' allocation), done now; returns the launch itself."""
    N, S, K = x3.shape
    cfg = _forward_config(K, x3.dtype, _row_kind(x3))
    plan = _rows(x3, grad3, cfg)
    loss, stats = rows if rows is not None else (None, None)
    args = [
        x3,
        target,
        loss,
        stats,
        grad3,
        workspace,
        None,  # partials, below
        out,
        inv,
        weight,
        weight_sum,
        N * S,
        K,
        S,
        plan.n_blocks,
        plan.blocks_per_image,
        *plan.x_strides,
        target.stride(0),
        weight.stride(0) if weight is not None else 0,
        *plan.g_strides,
        hp.drainage_idx,
        hp.ignore_index,
        *_hi_lo(hp.h1),
        *_hi_lo(hp.h2),
    ]
    kwargs = dict(
        MEMBER=hp.member,
        HAS_WEIGHT=weight is not None,
        LAYOUT=cfg.layout,
        **_block_constexprs(cfg, plan, x3),
        WRITE_ROWS=rows is not None,
        WRITE_GRAD=grad3 is not None,
        REDUCE=reduce,
        COMPUTE=_compute_dtype(x3.dtype),
        **_options(cfg.num_warps),
    )
    grid = _forward_grid(cfg, plan, x3, args, kwargs)
    if reduce:
        args[6] = torch.empty(grid, dtype=loss_dtype(x3), device=x3.device)

    def launch():
        with _device_guard(x3):
            _drainage_fwd_kernel[(grid,)](*args, **kwargs)

    return launch


def _forward_grid(cfg: _Config, plan: _Rows, x3: torch.Tensor, args, kwargs) -> int:
    """One wave of programs: STREAM keeps one program per SM (the rows in flight stay in L2 for the
    gradient's second read), the other layouts as many as fit on an SM (_occupancy)."""
    if x3.device.type != "cuda":
        return min(plan.n_blocks, INTERPRETED_GRID)
    if cfg.layout == STREAM:
        per_sm = 1
    else:
        # The specialisations Triton compiles apart (alignment of the logits and of K) are in the key.
        constexprs = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        key = ("fwd", constexprs, x3.device, x3.data_ptr() % 16 == 0, x3.shape[-1] % 16 == 0)
        if key not in _OCCUPANCY and kwargs["REDUCE"]:
            args = list(args)
            args[6] = x3.new_empty(1, dtype=loss_dtype(x3))  # the compile needs the partials' pointer
        per_sm = _occupancy(_drainage_fwd_kernel, tuple(args), kwargs, x3.device, key)
    return min(plan.n_blocks, _sm_count(x3.device) * per_sm)


def _forward_rows(x3, target, hp: Hyper, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    R = x3.shape[0] * x3.shape[1]
    loss = torch.empty(R, dtype=loss_dtype(x3), device=x3.device)
    stats = torch.empty(ROW_TERMS, R, dtype=loss.dtype, device=x3.device)
    if R:
        launch = _prepare_forward(x3, target, hp, (loss, stats), None, 0, None, None, None, weight)
        # the check alone
        _launch_targets(target, x3.shape[-1], hp, _workspace(x3.device), count=False, weight=weight)
        launch()
    return loss, stats


def _launch_backward(x3, target, stats, grad_rows, hp: Hyper):
    N, S, K = x3.shape
    R = N * S
    grad3 = torch.empty_like(x3)  # keeps a dense input's layout (e.g. channels_last)
    if R == 0:
        return grad3
    cfg = _backward_config(K, x3.dtype, _row_kind(x3))
    plan = _rows(x3, grad3, cfg)
    col_blocks = triton.cdiv(K, cfg.block_k)
    with _device_guard(x3):
        _drainage_bwd_kernel[(plan.n_blocks, col_blocks)](
            x3,
            target,
            stats,
            grad_rows,
            grad3,
            R,
            K,
            S,
            plan.blocks_per_image,
            *plan.x_strides,
            target.stride(0),
            grad_rows.stride(0),
            *plan.g_strides,
            hp.drainage_idx,
            hp.ignore_index,
            **_block_constexprs(cfg, plan, x3),
            COMPUTE=_compute_dtype(x3.dtype),
            **_options(cfg.num_warps),
        )
    return grad3


def forward(
    x3: torch.Tensor, target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, K) logits view, (R,) targets, (R,) sample weights or None -> per-row (weighted) loss
    (R,) and row terms (4, R)."""
    if torch.compiler.is_compiling():
        return torch.ops.drainage_fast.triton_forward(x3, target, *hp, weight)
    return _forward_rows(x3, target, hp, weight)


def backward(x3, target, stats, grad_rows, hp: Hyper) -> torch.Tensor:
    """Gradient (N, S, K) of sum_r grad_rows[r] * loss[r]; grad_rows may have any stride, 0 too."""
    if torch.compiler.is_compiling():
        return torch.ops.drainage_fast.triton_backward(
            x3, target, stats, grad_rows, hp.drainage_idx, hp.ignore_index
        )
    return _launch_backward(x3, target, stats, grad_rows, hp)


def forward_reduced(x3, target, hp: Hyper, mean: bool, with_grad: bool, weight: torch.Tensor | None = None):
    """The sum or mean of the (weighted) row losses, (1 / divisor for a mean), and with_grad the
    gradient of that reduced loss, written while each row is at hand: two launches (the targets
    kernel, the forward with its reduction) and one read of the logits. Eager mode only (see
    backends.Backend)."""
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
    workspace = _workspace(x3.device)
    weight_sum = torch.empty(1, dtype=dtype, device=x3.device) if weight is not None else None
    # Everything that can fail on the host (the partials' allocation, the compile) comes before the
    # targets kernel adds the count into the workspace; anything after it (Ctrl-C included) zeroes
    # the workspace again, or the next call's mean would divide by the sum of two counts.
    launch = _prepare_forward(
        x3, target, hp, None, grad3, 2 if mean else 1, workspace, out, inv, weight, weight_sum
    )
    try:
        _launch_targets(target, x3.shape[-1], hp, workspace, count=mean, weight=weight, weight_sum=weight_sum)
        launch()
    except BaseException:
        workspace.zero_()
        raise
    return out, inv, grad3, None


def forward_grad_(
    x3: torch.Tensor, target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """See backends.Backend: the row losses, and x3 overwritten with the gradient of their sum, in
    place (each program reads a row, or a tile of it, before it writes there). Two launches."""
    R = x3.shape[0] * x3.shape[1]
    loss = torch.empty(R, dtype=loss_dtype(x3), device=x3.device)
    if R == 0:
        return loss
    stats = torch.empty(ROW_TERMS, R, dtype=loss.dtype, device=x3.device)
    launch = _prepare_forward(x3, target, hp, (loss, stats), x3, 0, None, None, None, weight)
    _launch_targets(target, x3.shape[-1], hp, _workspace(x3.device), count=False, weight=weight)
    launch()
    return loss


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
            grad, grad_out, numel, BLOCK=block, COMPUTE=_compute_dtype(grad.dtype), **_options(4)
        )
    return grad


@torch.library.custom_op("drainage_fast::triton_forward", mutates_args=())
def _forward_op(
    x3: torch.Tensor,
    target: torch.Tensor,
    h1: float,
    h2: float,
    drainage_idx: int,
    ignore_index: int,
    member: int,
    weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_rows(x3, target, Hyper(h1, h2, drainage_idx, ignore_index, member), weight)


@_forward_op.register_fake
def _(x3, target, h1, h2, drainage_idx, ignore_index, member, weight):
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
    hp = Hyper(0.0, 0.0, drainage_idx, ignore_index)  # the backward needs no member nor its parameters
    return _launch_backward(x3, target, stats, grad_rows, hp)


@_backward_op.register_fake
def _(x3, target, stats, grad_rows, drainage_idx, ignore_index):
    return torch.empty_like(x3)
