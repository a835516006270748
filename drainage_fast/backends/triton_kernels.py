"""Triton kernels of the drainage loss.

Rows: the logits are seen as R = N * S rows of K outputs (S = prod of the spatial dims, 1 for (N, K)
input). Row r = n * S + s starts at n * stride_n + s * stride_s; its outputs are stride_k apart.
All offsets are int64 (N * K may exceed 2^31); math is fp32 (fp64 for fp64 input), loads are cast
right after the load and stores cast back, which is also what the CPU interpreter needs for bf16.

One pass over a row gives z_t, z_d, the max m of J = all outputs but {t, d} and s = the sum over J
of exp(z_j - m). With lse_J = m + log(s) and L = logaddexp(z_d, lse_J):

    a = log(alpha) + L - z_t        b = log(beta) + lse_J - z_d        l = logsumexp(0, a, b)

The gradient is a 3-way softmax (pi_a, pi_b) = exp((a, b) - l) spread over the row:

    dl/dz_t = -pi_a        dl/dz_d = pi_a exp(z_d - L) - pi_b
    dl/dz_j = exp(z_j - m) * c,   c = pi_a exp(m - L) + pi_b / s      (j in J; every factor <= 1)

Every exponent is a difference of nearby values, never a sum of two large ones, so the gradient
keeps its precision at any logit scale (exp(z_j + w) with w ~ -z_j loses all of it at |z| ~ 1e7).
An infinite logit follows the reference (autograd of drainage_fast.reference): x - x := 0 where
both are the same infinity, so e.g. z_t = -inf gives loss inf and the finite limit gradient.

Rows whose target is ignore_index get loss 0 and gradient 0; a target out of [0, K) or equal to d
poisons its row with NaN (the API rejects such targets before they get here).

How a block of rows maps to memory (ROWS_MODE, chosen by the launcher):
  FLAT_ROWS   row r at r * stride_s: (N, K) logits, and per-pixel logits whose rows are evenly spaced
              (channels_last): no division per row.
  DIV_ROWS    n = r // S per row, in 32-bit arithmetic when R < 2^31 (INDEX32: a 64-bit division
              is a ~80-instruction subroutine, a 32-bit one a few multiplies).
  PIXEL_ROWS  a block is BLOCK_ROWS consecutive pixels s of one image n, for per-pixel logits whose
              pixel axis is contiguous (NCHW): Triton then sees the pixels as contiguous and lays
              consecutive lanes along them, so a warp reads whole sectors of each output column.

Unit-stride rows of a length that is not a multiple of 16 bytes start anywhere (K = C + 1 is odd for
every common dataset), and Triton can prove no alignment for them: the loads are scalar. With
ALIGNED, each row is read as a body that starts on the first 16-byte boundary of the row and is a
whole number of 16-byte vectors long (aligned by construction, so Triton vectorizes it), plus an edge
tile of 2V elements (V per 16 bytes) for the head before that boundary and the tail after the body.
"""

import triton
import triton.language as tl

from .._inputs import TARGET_MESSAGE, WEIGHT_MESSAGE

# A global that a @triton.jit function reads must be a tl.constexpr instance (an annotation is not
# enough: the code generator rejects the plain float).
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): exp2 is the native instruction
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
FINAL_BLOCK = tl.constexpr(1024)  # partials the last program adds per step (one per program)
TARGET_ASSERT = tl.constexpr(TARGET_MESSAGE)
WEIGHT_ASSERT = tl.constexpr(WEIGHT_MESSAGE)
# The column index of a tile position that holds no element of the row: it matches neither a target
# (-1 for ignored rows) nor the drainage output.
NO_COLUMN = tl.constexpr(-2)
# Adjacent pixels a thread in PIXEL_ROWS blocks (the launcher's ROWS_PER_THREAD).
PIXEL_VECTOR = tl.constexpr(4)

# Layouts of the forward (the launcher, triton_launch.py, says which rows take which).
COLUMNS = tl.constexpr(0)  # one row per thread, loops over the columns
TILE = tl.constexpr(1)  # a [BLOCK_ROWS, BLOCK_K] tile of rows in registers
STREAM = tl.constexpr(2)  # one row at a time in BLOCK_K-wide tiles, online log-sum-exp
# Members of the family (_members.Member).
DRAINAGE = tl.constexpr(0)
GAMBLERS = tl.constexpr(1)
DAC = tl.constexpr(2)
CE_ALL = tl.constexpr(3)
CE_CLASSES = tl.constexpr(4)
# Row modes (module docstring).
FLAT_ROWS = tl.constexpr(0)
DIV_ROWS = tl.constexpr(1)
PIXEL_ROWS = tl.constexpr(2)
# The workspace of a (device, stream, thread): int64 slots, zero between calls.
WS_COUNT = tl.constexpr(0)
WS_TICKET = tl.constexpr(1)
WS_BAD = tl.constexpr(2)
WS_TICKET2 = tl.constexpr(3)  # the targets kernel's ticket (a weighted mean's divisor)
WS_BAD_WEIGHT = tl.constexpr(4)


@triton.jit
def _log1p(x):
    # log1p(x) = log(u) * x / (u - 1) with u = 1 + x (Goldberg): full relative precision for tiny x,
    # where log(1 + x) rounds to 0. A confident row's loss is ~exp(a) + exp(b), far below fp32 eps.
    u = 1.0 + x
    tiny = u == 1.0
    return tl.where(tiny, x, tl.log(u) * (x / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def _sub(x, y):
    """x - y, and 0 where x == y (also when both are the same infinity, where x - y is nan)."""
    return tl.where(x == y, 0.0, x - y)


@triton.jit
def _exp_sub(x, y):
    """exp(x - y), and 1 where x == y: the one exponential of the element loops."""
    return tl.where(x == y, 1.0, tl.exp2((x - y) * LOG2E))


@triton.jit
def _logaddexp(x, y):
    # NaN must survive: the default max/min drop a NaN operand on GPU.
    hi = tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)
    lo = tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)
    empty = hi == NEG_INF  # both -inf (e.g. J empty): the result is -inf, not nan
    # _exp_sub: two equal infinities add to that infinity (exp(inf - inf) would be nan).
    return tl.where(empty, hi, hi + _log1p(_exp_sub(lo, tl.where(empty, 0.0, hi))))


@triton.jit
def _div_rn(x, y, COMPUTE: tl.constexpr):
    """x / y correctly rounded, as torch divides: a plain fp32 division is approximate on a GPU
    (div.full.f32); fp64 division is exact already (div_rn takes fp32 only)."""
    if COMPUTE == tl.float64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _rows_of_block(
    block,
    n_rows,
    S,
    blocks_per_image,
    BLOCK_ROWS: tl.constexpr,
    ROWS_MODE: tl.constexpr,
    INDEX32: tl.constexpr,
):
    """(rows, row_ok, n, s) of row block `block`: row r = n * S + s, as int64 [BLOCK_ROWS] vectors
    (FLAT_ROWS: n = 0 and s = r; PIXEL_ROWS: n is the block's one image). A row starts at
    n * stride_n + s * stride_s. INDEX32: the rows and blocks fit in 32 bits, and so do the
    divisions (a 64-bit division is a ~80-instruction subroutine, a 32-bit one a few multiplies)."""
    # int64 however the caller's loop counter is typed (the interpreter's is a plain int).
    block = tl.full([], 0, tl.int64) + block
    if ROWS_MODE == PIXEL_ROWS:
        if INDEX32:  # one division per block of pixels
            n = (block.to(tl.int32) // blocks_per_image).to(tl.int64)
        else:
            n = block // blocks_per_image
        # At most PIXEL_VECTOR adjacent pixels a thread: Triton would take 16 bytes of bf16 (8
        # pixels), and so 8 rows' math a thread (174 registers against 100).
        s = (block - n * blocks_per_image) * BLOCK_ROWS + tl.max_contiguous(
            tl.arange(0, BLOCK_ROWS), PIXEL_VECTOR
        )
        rows = n * S + s
        row_ok = s < S
    else:
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        if ROWS_MODE == FLAT_ROWS:
            n = 0
            s = rows
        elif INDEX32:
            n32 = rows.to(tl.int32) // S
            n = n32.to(tl.int64)
            s = (rows.to(tl.int32) - n32 * S).to(tl.int64)
        else:
            n = rows // S
            s = rows - n * S
    return rows, row_ok, n, s


@triton.jit
def _aligned_body(x_row, K, V: tl.constexpr):
    """(body, head, n_body) of rows starting at element offsets x_row: the body starts at the first
    multiple of V (16 bytes) in the row, head = body - x_row < V elements precede it, and it is
    n_body elements long, a multiple of V (the launcher takes this path for K >= 2V only)."""
    body = tl.multiple_of(((x_row + (V - 1)) // V) * V, V)
    head = body - x_row
    n_body = ((K - head) // V) * V
    return body, head, n_body


@triton.jit
def _edge_columns(head, n_body, K, row_ok, V: tl.constexpr):
    """[ROWS, 2V] column indices of the elements outside the body (the head's first, the tail's
    after; NO_COLUMN where there is no such element), and which of them exist."""
    e = tl.arange(0, 2 * V)[None, :]
    is_head = e < V
    cols = tl.where(is_head, e, head[:, None] + n_body[:, None] + (e - V))
    ok = row_ok[:, None] & tl.where(is_head, e < head[:, None], cols < K)
    return tl.where(ok, cols, NO_COLUMN).to(tl.int32), ok


@triton.jit
def _load_tile(X_ptr, x_row, row_ok, cols, K, stride_k, COMPUTE: tl.constexpr):
    """[ROWS, BLOCK_K] tile of logits in the compute dtype; -inf outside the row."""
    ptrs = X_ptr + x_row[:, None] + cols[None, :].to(tl.int64) * stride_k
    mask = row_ok[:, None] & (cols < K)[None, :]
    return tl.load(ptrs, mask=mask, other=float("-inf")).to(COMPUTE)


@triton.jit
def _is_col(cols, k):
    """cols == k over a [ROWS, BLOCK_K] tile: cols the tile's column indices ([BLOCK_K] or the tile's
    shape), k a scalar or one index per row ([ROWS])."""
    if len(cols.shape) == 1:
        cols = cols[None, :]
    if len(k.shape) == 1:
        k = k[:, None]
    return cols == k


@triton.jit
def _in_body(k, head, n_body):
    """Column k of each row in the coordinates of its aligned body (0 at the body's first element),
    or NO_COLUMN when k is not in the body: the body tiles then compare their own arange with it."""
    k_body = k - head
    return tl.where((k_body >= 0) & (k_body < n_body), k_body, NO_COLUMN).to(tl.int32)


@triton.jit
def _only_J(x, cols, t, d):
    """The tile with -inf at the target and drainage columns (_is_col's cols, t and d)."""
    return tl.where(_is_col(cols, t) | _is_col(cols, d), NEG_INF, x)


@triton.jit
def _pick(x, cols, k):
    """x[r, k[r]] of each row of a tile (0 where no column of the tile is k[r]; -1 matches none),
    exactly: the other terms of the sum are 0."""
    return tl.sum(tl.where(_is_col(cols, k), x, 0.0), axis=1)


@triton.jit
def _online_max_sum(m, s, x, cols, t, d):
    """One tile of the online (max, sum of exp) over J: the target t and drainage output d are
    skipped. Returns the new (m, s) and the tile's exp(x_j - shift) (0 outside J), shift being the
    new m, or 0 while every entry of J seen is -inf."""
    x_J = _only_J(x, cols, t, d)
    m_new = tl.maximum(m, tl.max(x_J, axis=1))
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    e = _exp_sub(x_J, shift[:, None])
    return m_new, s * _exp_sub(m, shift) + tl.sum(e, axis=1), e


@triton.jit
def _softplus(x):
    """log(1 + exp(x)): exact for large x, full relative precision for very negative x; nan stays."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _one_minus_exp_neg(x):
    """1 - exp(-x) for x >= 0, of full relative precision for tiny x (Kahan: (1 - u) x / -log u with
    u = exp(-x)); from x = 1/2 on, 1 - u directly (u may be subnormal there, too coarse to take the
    log of)."""
    u = tl.exp(-x)
    safe = tl.where((u == 1.0) | (x > 0.5), 0.5, u)
    kahan = tl.where(u == 1.0, x, (1.0 - safe) * (x / -tl.log(safe)))
    return tl.where(x > 0.5, 1.0 - u, kahan)


@triton.jit
def _softplus2(a, b):
    """(l, log pi_a, log pi_b) of l = logsumexp(0, a, b), (pi_a, pi_b) = exp((a, b) - l).

    l = mx + log1p(the two smaller terms): exact for the largest term, and a confident row (mx = 0)
    keeps the full relative precision of its tiny loss. a = b = +inf leaves the split undefined: nan.
    """
    mx = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    mx = tl.maximum(mx, 0.0, propagate_nan=tl.PropagateNan.ALL)
    da = _sub(a, mx)
    db = _sub(b, mx)
    ea = tl.exp(da)
    eb = tl.exp(db)
    e0 = tl.exp(-mx)
    log_z = _log1p(tl.where(a == mx, e0 + eb, tl.where(b == mx, e0 + ea, ea + eb)))
    undefined = (a == POS_INF) & (b == POS_INF)
    log_pa = tl.where(undefined, float("nan"), da - log_z)
    log_pb = tl.where(undefined, float("nan"), db - log_z)
    return mx + log_z, log_pa, log_pb


@triton.jit
def _row_terms(z_t, z_d, m, s, h1, h2, MEMBER: tl.constexpr):
    """Loss and gradient terms of rows of a member (MEMBER, _members.Member; h1, h2 its runtime
    hyper-parameters) with the given z_t, z_d and J's (max m, sum s). backends/reference.py states
    the same formulas in plain PyTorch, with their derivations.

    Returns (loss, shift, c, g_t, g_d): dl/dz_t = g_t, dl/dz_d = g_d, dl/dz_j = exp(z_j - shift) * c
    for j in J. Every member is written in three differences of the inputs (z_t - z_d, m - z_t,
    m - z_d) and log s: no constant is added to a number of the logits' magnitude, and no two such
    numbers are subtracted, so the terms keep their precision at any logit scale.
    """
    J_empty = s == 0.0  # K = 2, or every z_j is -inf
    shift = tl.where(m == NEG_INF, 0.0, m)
    log_s = tl.where(J_empty, NEG_INF, tl.log(tl.where(J_empty, 1.0, s)))
    # Plain differences: an infinity meets an infinity as in the oracle (nan), but for two -inf.
    d_td = tl.where((z_t == NEG_INF) & (z_d == NEG_INF), 0.0, z_t - z_d)
    d_mt = shift - z_t
    d_md = shift - z_d
    J_t = tl.where(J_empty, NEG_INF, d_mt + log_s)  # lse_J - z_t
    J_d = tl.where(J_empty, NEG_INF, d_md + log_s)  # lse_J - z_d
    m_L = -_logaddexp(-d_md, log_s)  # m - L, L = logaddexp(z_d, lse_J)
    if MEMBER == DRAINAGE:  # h1, h2 = log alpha, log beta
        loss, log_pa, log_pb = _softplus2(h1 + _logaddexp(-d_td, J_t), h2 + J_d)
        g_t = -tl.exp(log_pa)
        g_d = tl.exp(log_pa - _logaddexp(tl.zeros_like(J_d), J_d)) - tl.exp(log_pb)
        c = tl.exp(_logaddexp(log_pa + m_L, log_pb - log_s))
    elif MEMBER == GAMBLERS:  # h1, h2 = log o, log(1 - 1 / o); A formed against its larger term
        t_leads = d_td + h1 >= 0
        A_t = _softplus(-d_td - h1)  # A - z_t
        A_v = _softplus(d_td + h1)  # A - (z_d - log o)
        z_d_A = tl.where(t_leads, -d_td - A_t, h1 - A_v)
        lse_J_A = tl.where(t_leads, J_t - A_t, J_d + h1 - A_v)
        loss, log_pa, log_pb = _softplus2(h2 + z_d_A, lse_J_A)
        sigma_u = tl.exp(tl.where(t_leads, -A_t, d_td + h1 - A_v))
        sigma_v = tl.exp(tl.where(t_leads, -d_td - h1 - A_t, -A_v))
        kept_mass = _one_minus_exp_neg(loss)  # pi_a + pi_b
        g_t = -kept_mass * sigma_u
        g_d = tl.exp(log_pa) * sigma_u - tl.exp(log_pb) * sigma_v  # no cancellation near sigma_v ~ 1
        c = tl.exp(log_pb - log_s)
    elif MEMBER == DAC:  # h1 = alpha
        ce = _softplus(J_t)
        z_d_B = tl.where(J_t <= 0, -d_td - ce, -J_d - _softplus(-J_t))  # against B's larger term
        sp = _softplus(z_d_B)
        p_d = _sigmoid(z_d_B)
        q = tl.exp(-sp)
        r = h1 - q * ce
        loss = q * ce + h1 * sp
        g_d = p_d * r
        g_t = -p_d * r * _sigmoid(-J_t) - q * _sigmoid(J_t)
        c = tl.exp(-log_s) * _sigmoid(J_t) * (q - p_d * r)
    elif MEMBER == CE_ALL:
        D = _logaddexp(-d_td, J_t)  # L - z_t
        loss = _softplus(D)
        sigma = _sigmoid(D)  # 1 - p_t
        g_t = -sigma
        g_d = sigma * tl.exp(-_logaddexp(tl.zeros_like(J_d), J_d))
        c = sigma * tl.exp(m_L)
    else:  # CE_CLASSES: softplus(lse_J - z_t)
        loss = _softplus(J_t)
        sigma = _sigmoid(J_t)
        g_t = -sigma
        g_d = tl.zeros_like(sigma)
        c = tl.exp(-log_s) * sigma
    return loss, shift, tl.where(J_empty, 0.0, c), g_t, g_d


@triton.jit
def _grad_tile(e, cols, t, d, c, g_t, g_d, kept, scale):
    """scale * gradient of a [ROWS, BLOCK_K] tile, from e = exp(x - shift),
    the tile's column indices (_is_col), the target and drainage columns and the [ROWS] row terms;
    scale is a scalar or a [ROWS] vector.

    The same expression, in the same order (e * c first, then the scale), in the fused forward and
    in the backward, so that both give the same bits. `kept` is a select, not a product: an ignored
    row with inf / nan logits still gets exactly 0.
    """
    at_t, at_d = _is_col(cols, t), _is_col(cols, d)
    c, g_t, g_d, kept = c[:, None], g_t[:, None], g_d[:, None], kept[:, None]
    if len(scale.shape) == 1:
        scale = scale[:, None]
    g = e * c
    g = tl.where(at_t, g_t, g)
    g = tl.where(at_d, g_d, g)
    return tl.where(kept, g * scale, 0.0)


@triton.jit
def _store_tile(G_ptr, g, g_row, row_ok, cols, K, g_stride_k):
    ptrs = G_ptr + g_row[:, None] + cols[None, :].to(tl.int64) * g_stride_k
    tl.store(ptrs, g.to(G_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _columns_max_sum(X_ptr, x_row, row_ok, t, d, K, stride_k, CHUNK: tl.constexpr, COMPUTE: tl.constexpr):
    """(max, sum of exp) over J of rows held one per thread: two passes over the columns, CHUNK
    columns a step (the second pass reads the rows again from L1 / L2), one exponential per element.

    A step is one [ROWS, CHUNK] load: its loads are in flight together (a loop over single columns,
    even unrolled, left ptxas reusing one register for them: one load in flight a thread).
    The loops are not unrolled: unrolled, the compiler keeps every column's address (or value) live
    from one pass to the next, 254 registers for strided (NCHW) rows.
    """
    m = tl.full(t.shape, float("-inf"), COMPUTE)
    for k0 in range(0, K, CHUNK):
        cols = k0 + tl.arange(0, CHUNK)
        x = _load_tile(X_ptr, x_row, row_ok, cols, K, stride_k, COMPUTE)
        m = tl.maximum(m, tl.max(_only_J(x, cols, t, d), axis=1))
    shift = tl.where(m == NEG_INF, 0.0, m)
    s = tl.zeros(t.shape, COMPUTE)
    for k0 in range(0, K, CHUNK):
        cols = k0 + tl.arange(0, CHUNK)
        x = _load_tile(X_ptr, x_row, row_ok, cols, K, stride_k, COMPUTE)
        s += tl.sum(_exp_sub(_only_J(x, cols, t, d), shift[:, None]), axis=1)
    return m, s


@triton.jit
def _drainage_fwd_kernel(
    X_ptr,
    T_ptr,
    Loss_ptr,
    Stats_ptr,
    G_ptr,
    WS_ptr,
    Part_ptr,
    Out_ptr,
    Inv_ptr,
    W_ptr,
    WSum_ptr,  # data, see the flags
    n_rows,
    K,
    S,
    n_blocks,
    blocks_per_image,  # shapes: rows, outputs, pixels per image, row blocks (PIXEL_ROWS: per image)
    x_stride_n,
    x_stride_s,
    x_stride_k,
    t_stride,
    w_stride,  # input strides (FLAT_ROWS: x_stride_s is the row stride)
    g_stride_n,
    g_stride_s,
    g_stride_k,  # gradient strides (WRITE_GRAD)
    drainage_idx,
    ignore_index,  # hyper-parameters; the member's h1, h2 as fp32 hi + lo pairs
    h1_hi,
    h1_lo,
    h2_hi,
    h2_lo,
    MEMBER: tl.constexpr,  # the loss (_members.Member)
    HAS_WEIGHT: tl.constexpr,  # per-row sample weights at W_ptr; a mean divides by their sum
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,  # COLUMNS: the columns a step of its column loops
    LAYOUT: tl.constexpr,  # COLUMNS, TILE or STREAM
    ROWS_MODE: tl.constexpr,  # FLAT_ROWS, DIV_ROWS or PIXEL_ROWS
    INDEX32: tl.constexpr,  # row and block indices below 2^31 (_rows_of_block)
    ALIGNED: tl.constexpr,  # unit-stride rows read as aligned body + edges (module docstring)
    SAME_OFFSETS: tl.constexpr,  # the gradient has the logits' strides: its body is aligned too
    V: tl.constexpr,  # elements per 16 bytes
    WRITE_ROWS: tl.constexpr,  # per-row loss (R,) and row terms (4, R) = [shift, c, g_t, g_d]
    WRITE_GRAD: tl.constexpr,  # the gradient of the reduced loss, while the row is at hand
    REDUCE: tl.constexpr,  # 0: none; 1: sum; 2: mean (the divisor at WS_ptr[WS_COUNT] or WSum_ptr)
    COMPUTE: tl.constexpr,
):
    """The forward over a grid-stride loop of row blocks.

    With REDUCE, each program adds its rows' losses in a fixed order into Part_ptr[program]; the last
    program to finish (an integer ticket in the workspace) adds the partials in program order into
    Out_ptr, writes 1 / count (mean) into Inv_ptr and zeroes the workspace for the next call: the
    reduction is deterministic and needs no other launch. The gradient of a mean is scaled by
    1 / count here, from the count the targets kernel wrote before this launch (with sample weights:
    the sum of the kept rows' weights, which the targets kernel wrote into WSum_ptr).
    """
    # Triton passes Python floats as fp32 (Inductor-generated calls as fp64: the casts pin the math
    # to COMPUTE either way). The lo parts restore ~48 bits for fp64 inputs; in fp32 they vanish.
    h1 = tl.cast(h1_hi, COMPUTE) + tl.cast(h1_lo, COMPUTE)
    h2 = tl.cast(h2_hi, COMPUTE) + tl.cast(h2_lo, COMPUTE)
    # Column indices are compared as int32 (d < K < 2^31); addresses are int64: (K - 1) * stride_k
    # passes 2^31 for strided rows (NCHW) with many pixels.
    d = tl.cast(drainage_idx, tl.int32)
    d_offset = tl.cast(drainage_idx, tl.int64) * x_stride_k
    j = tl.arange(0, BLOCK_K)
    if REDUCE == 2:
        # div_rn: a correctly rounded 1 / count, the bits torch.reciprocal gives the recompute path
        # (a plain fp32 division is approximate on a GPU). count 0 (every row ignored): inf, and
        # every gradient is 0 all the same (the kept select in _grad_tile).
        if HAS_WEIGHT:
            divisor = tl.load(WSum_ptr).to(COMPUTE)
        else:
            divisor = tl.load(WS_ptr + WS_COUNT).to(COMPUTE)
        scale = _div_rn(tl.full([], 1.0, COMPUTE), divisor, COMPUTE)
    else:
        scale = tl.full([], 1.0, COMPUTE)
    loss_acc = tl.zeros([BLOCK_ROWS], COMPUTE)
    # int64 bounds: the block count and the row indices pass 2^31 on large per-pixel batches.
    program = tl.program_id(0).to(tl.int64)
    for block in range(program, tl.cast(n_blocks, tl.int64), tl.num_programs(0)):
        rows, row_ok, img, pix = _rows_of_block(
            block, n_rows, S, blocks_per_image, BLOCK_ROWS, ROWS_MODE, INDEX32
        )
        x_row = img * x_stride_n + pix * x_stride_s
        t_raw = tl.load(T_ptr + rows * t_stride, mask=row_ok, other=ignore_index).to(tl.int64)
        kept = t_raw != ignore_index
        bad = kept & ((t_raw < 0) | (t_raw >= K) | (t_raw == d))  # the targets kernel asserts on these
        # Compared with the columns as int32; -1 matches no column (ignored and bad rows).
        t = tl.where(kept & ~bad, t_raw, -1).to(tl.int32)
        if LAYOUT != TILE:  # a tile holds z_t and z_d already (below): no scalar loads for them
            z_t = tl.load(X_ptr + x_row + t_raw * x_stride_k, mask=row_ok & kept & ~bad, other=0.0).to(
                COMPUTE
            )
            z_d = tl.load(X_ptr + x_row + d_offset, mask=row_ok, other=0.0).to(COMPUTE)

        if LAYOUT == COLUMNS:  # one row per thread, no row math repeated across threads
            m, s = _columns_max_sum(X_ptr, x_row, row_ok, t, d, K, x_stride_k, BLOCK_K, COMPUTE)
        elif LAYOUT == TILE:  # the row tile stays in registers: one read of the logits
            if ALIGNED:
                body, head, n_body = _aligned_body(x_row, K, V)
                # The body tile compares its arange with t and d in body coordinates: no [ROWS,
                # BLOCK_K] tensor of column indices is held in registers.
                in_body = row_ok[:, None] & (j[None, :] < n_body[:, None])
                cols, t_body, d_body = j, _in_body(t, head, n_body), _in_body(d, head, n_body)
                x = tl.load(X_ptr + body[:, None] + j[None, :], mask=in_body, other=NEG_INF).to(COMPUTE)
                e_cols, e_ok = _edge_columns(head, n_body, K, row_ok, V)
                x_edge = tl.load(X_ptr + x_row[:, None] + e_cols, mask=e_ok, other=NEG_INF).to(COMPUTE)
                z_t = _pick(x, cols, t_body) + _pick(x_edge, e_cols, t)
                z_d = _pick(x, cols, d_body) + _pick(x_edge, e_cols, d)
                x_J = _only_J(x, cols, t_body, d_body)
                edge_J = _only_J(x_edge, e_cols, t, d)
                m = tl.maximum(tl.max(x_J, axis=1), tl.max(edge_J, axis=1))
                shift = tl.where(m == NEG_INF, 0.0, m)
                e = _exp_sub(x_J, shift[:, None])
                e_edge = _exp_sub(edge_J, shift[:, None])
                s = tl.sum(e, axis=1) + tl.sum(e_edge, axis=1)
            else:
                cols, t_body, d_body = j, t, d
                x = _load_tile(X_ptr, x_row, row_ok, j, K, x_stride_k, COMPUTE)
                z_t = _pick(x, cols, t)
                z_d = _pick(x, cols, d)
                # From m = -inf the tile's shift is the final one: e is the gradient's exponential.
                m = tl.full([BLOCK_ROWS], float("-inf"), COMPUTE)
                m, s, e = _online_max_sum(m, tl.zeros([BLOCK_ROWS], COMPUTE), x, cols, t_body, d_body)
        else:  # STREAM: online log-sum-exp over BLOCK_K-wide tiles
            m = tl.full([BLOCK_ROWS], float("-inf"), COMPUTE)
            s = tl.zeros([BLOCK_ROWS], COMPUTE)
            if ALIGNED:
                body, head, n_body = _aligned_body(x_row, K, V)
                e_cols, e_ok = _edge_columns(head, n_body, K, row_ok, V)
                x_edge = tl.load(X_ptr + x_row[:, None] + e_cols, mask=e_ok, other=NEG_INF).to(COMPUTE)
                m, s, _edge_e = _online_max_sum(m, s, x_edge, e_cols, t, d)
                t_body, d_body = _in_body(t, head, n_body), _in_body(d, head, n_body)
                for j0 in range(0, K, BLOCK_K):
                    jj = j0 + j
                    in_body = row_ok[:, None] & (jj[None, :] < n_body[:, None])
                    x = tl.load(X_ptr + body[:, None] + jj[None, :], mask=in_body, other=NEG_INF).to(COMPUTE)
                    m, s, _ = _online_max_sum(m, s, x, jj, t_body, d_body)
            else:
                for k0 in range(0, K, BLOCK_K):
                    x = _load_tile(X_ptr, x_row, row_ok, k0 + j, K, x_stride_k, COMPUTE)
                    m, s, _ = _online_max_sum(m, s, x, k0 + j, t, d)

        loss, shift, c, g_t, g_d = _row_terms(z_t, z_d, m, s, h1, h2, MEMBER)
        if HAS_WEIGHT:  # the weighted loss w_r l_r: its row terms scale by w_r
            w = tl.load(W_ptr + rows * w_stride, mask=row_ok & kept, other=0.0).to(COMPUTE)
            loss, c, g_t, g_d = loss * w, c * w, g_t * w, g_d * w
        nan = float("nan")
        loss = tl.where(bad, nan, tl.where(kept, loss, 0.0))
        c = tl.where(bad, nan, c)
        g_t = tl.where(bad, nan, g_t)
        g_d = tl.where(bad, nan, g_d)
        kept = kept & row_ok
        if REDUCE != 0:
            loss_acc += tl.where(row_ok, loss, 0.0)
        if WRITE_ROWS:
            tl.store(Loss_ptr + rows, loss.to(Loss_ptr.dtype.element_ty), mask=row_ok)
            tl.store(Stats_ptr + rows, shift, mask=row_ok)
            n_rows64 = tl.cast(n_rows, tl.int64)
            tl.store(Stats_ptr + n_rows64 + rows, c, mask=row_ok)
            tl.store(Stats_ptr + 2 * n_rows64 + rows, g_t, mask=row_ok)
            tl.store(Stats_ptr + 3 * n_rows64 + rows, g_d, mask=row_ok)

        if WRITE_GRAD:
            g_row = x_row if SAME_OFFSETS else img * g_stride_n + pix * g_stride_s
            if LAYOUT == COLUMNS:
                # Third pass over the columns (L1 / L2 again), one exponential per element.
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + tl.arange(0, BLOCK_K)
                    x = _load_tile(X_ptr, x_row, row_ok, cols, K, x_stride_k, COMPUTE)
                    g = _grad_tile(_exp_sub(x, shift[:, None]), cols, t, d, c, g_t, g_d, kept, scale)
                    _store_tile(G_ptr, g, g_row, row_ok, cols, K, g_stride_k)
            elif LAYOUT == TILE:
                g = _grad_tile(e, cols, t_body, d_body, c, g_t, g_d, kept, scale)
                if ALIGNED:
                    g_body = body if SAME_OFFSETS else g_row + head
                    tl.store(G_ptr + g_body[:, None] + j[None, :], g.to(G_ptr.dtype.element_ty), mask=in_body)
                    g = _grad_tile(e_edge, e_cols, t, d, c, g_t, g_d, kept, scale)
                    tl.store(G_ptr + g_row[:, None] + e_cols, g.to(G_ptr.dtype.element_ty), mask=e_ok)
                else:
                    _store_tile(G_ptr, g, g_row, row_ok, j, K, g_stride_k)
            else:
                # Second read of the row. The launcher keeps one program per SM, so the rows in
                # flight were just streamed and this read mostly comes from L2.
                if ALIGNED:
                    g_body = body if SAME_OFFSETS else g_row + head
                    g_edge = _grad_tile(
                        _exp_sub(x_edge, shift[:, None]), e_cols, t, d, c, g_t, g_d, kept, scale
                    )
                    tl.store(G_ptr + g_row[:, None] + e_cols, g_edge.to(G_ptr.dtype.element_ty), mask=e_ok)
                    for j0 in range(0, K, BLOCK_K):
                        jj = j0 + j
                        in_body = row_ok[:, None] & (jj[None, :] < n_body[:, None])
                        x = tl.load(X_ptr + body[:, None] + jj[None, :], mask=in_body, other=NEG_INF).to(
                            COMPUTE
                        )
                        g = _grad_tile(
                            _exp_sub(x, shift[:, None]), jj, t_body, d_body, c, g_t, g_d, kept, scale
                        )
                        tl.store(
                            G_ptr + g_body[:, None] + jj[None, :], g.to(G_ptr.dtype.element_ty), mask=in_body
                        )
                else:
                    for k0 in range(0, K, BLOCK_K):
                        x = _load_tile(X_ptr, x_row, row_ok, k0 + j, K, x_stride_k, COMPUTE)
                        g = _grad_tile(_exp_sub(x, shift[:, None]), k0 + j, t, d, c, g_t, g_d, kept, scale)
                        _store_tile(G_ptr, g, g_row, row_ok, k0 + j, K, g_stride_k)

    if REDUCE != 0:
        pid = tl.program_id(0)
        tl.store(Part_ptr + pid, tl.sum(loss_acc))
        # acq_rel: this program's partial is visible before its ticket; the last program sees all.
        ticket = tl.atomic_add(WS_ptr + WS_TICKET, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            total = tl.zeros([FINAL_BLOCK], COMPUTE)
            for p0 in range(0, tl.num_programs(0), FINAL_BLOCK):
                offs = p0 + tl.arange(0, FINAL_BLOCK)
                # volatile: read from L2, where the other programs' partials are, never a stale L1 line
                total += tl.load(Part_ptr + offs, mask=offs < tl.num_programs(0), other=0.0, volatile=True)
            out = tl.sum(total)
            if REDUCE == 2:
                out = _div_rn(out, divisor, COMPUTE)  # correctly rounded, as torch's total / count
                tl.store(Inv_ptr, scale)
            tl.store(Out_ptr, out)
            # The workspace is zero again for the next call of this (device, stream, thread).
            tl.store(WS_ptr + WS_COUNT, 0)
            tl.store(WS_ptr + WS_TICKET, 0)


@triton.jit
def _one_lane_reports(n_bad, BLOCK: tl.constexpr):
    """The condition of the targets kernel's assert: false in lane 0 only when the block has a bad
    target, so that a failing program prints the message once, not once per thread."""
    return (tl.arange(0, BLOCK) != 0) | (n_bad == 0)


@triton.jit(debug=True)  # debug: the device-side asserts are compiled in (this kernel only)
def _targets_kernel(
    T_ptr,
    W_ptr,
    WS_ptr,
    WPart_ptr,
    WSum_ptr,
    n,
    t_stride,
    w_stride,
    K,
    drainage_idx,
    ignore_index,
    COUNT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Asserts that every target is ignore_index or in [0, K) and != drainage_idx (and with
    HAS_WEIGHT that every weight is finite and >= 0), and adds the bad ones into WS_ptr[WS_BAD]
    (WS_BAD_WEIGHT): the interpreter ignores device asserts, so the launcher reads these counts
    there. With COUNT it makes the divisor of a mean: the kept targets added into WS_ptr[WS_COUNT]
    (int64 atomics: the sum does not depend on the order, and a per-pixel batch can keep more than
    2^31 targets); with HAS_WEIGHT too, the sum of the kept rows' weights into WSum_ptr, made without
    a float atomic: each program writes its partial to WPart_ptr, and the last one to finish (a
    ticket in WS_ptr[WS_TICKET2]) adds them in program order. The number of programs depends on n
    alone, so the sum has the same bits on every GPU.

    It reads only the targets (and weights), before the forward: a mean's gradient needs the divisor
    while the forward writes it. A bad target stops the kernel; the error surfaces at the next
    synchronisation, as from torch._assert_async, without a host sync here.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64 before the multiply
    in_range = offs < n
    t = tl.load(T_ptr + offs * t_stride, mask=in_range, other=ignore_index).to(tl.int64)
    kept = in_range & (t != ignore_index)
    bad = kept & ((t < 0) | (t >= K) | (t == drainage_idx))
    n_bad = tl.sum(bad.to(tl.int64))
    tl.device_assert(_one_lane_reports(n_bad, BLOCK), TARGET_ASSERT)
    if n_bad > 0:
        tl.atomic_add(WS_ptr + WS_BAD, n_bad, sem="relaxed")
    if HAS_WEIGHT:
        w = tl.load(W_ptr + offs * w_stride, mask=in_range, other=0.0).to(COMPUTE)
        bad_w = in_range & ~((w >= 0.0) & (w < POS_INF))  # also true for nan
        n_bad_w = tl.sum(bad_w.to(tl.int64))
        tl.device_assert(_one_lane_reports(n_bad_w, BLOCK), WEIGHT_ASSERT)
        if n_bad_w > 0:
            tl.atomic_add(WS_ptr + WS_BAD_WEIGHT, n_bad_w, sem="relaxed")
    if COUNT:
        if HAS_WEIGHT:
            program = tl.program_id(0)
            tl.store(WPart_ptr + program, tl.sum(tl.where(kept, w, 0.0)))
            # acq_rel: this program's partial is visible before its ticket; the last program sees all.
            ticket = tl.atomic_add(WS_ptr + WS_TICKET2, 1, sem="acq_rel", scope="gpu")
            if ticket == tl.num_programs(0) - 1:
                total = tl.zeros([BLOCK], COMPUTE)
                for p0 in range(0, tl.num_programs(0), BLOCK):
                    parts = p0 + tl.arange(0, BLOCK)
                    # volatile: from L2, where the other programs' partials are
                    total += tl.load(
                        WPart_ptr + parts, mask=parts < tl.num_programs(0), other=0.0, volatile=True
                    )
                tl.store(WSum_ptr, tl.sum(total))
                tl.store(WS_ptr + WS_TICKET2, 0)
        else:
            tl.atomic_add(WS_ptr + WS_COUNT, tl.sum(kept.to(tl.int64)), sem="relaxed")


@triton.jit
def _drainage_bwd_kernel(
    X_ptr,
    T_ptr,
    Stats_ptr,
    DY_ptr,
    G_ptr,  # data
    n_rows,
    K,
    S,
    blocks_per_image,  # shapes
    x_stride_n,
    x_stride_s,
    x_stride_k,
    t_stride,
    dy_stride,  # input strides (dy_stride may be 0)
    g_stride_n,
    g_stride_s,
    g_stride_k,  # gradient strides
    drainage_idx,
    ignore_index,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS_MODE: tl.constexpr,
    INDEX32: tl.constexpr,
    ALIGNED: tl.constexpr,
    SAME_OFFSETS: tl.constexpr,
    V: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """grad[r, k] = g[r, k] * dy[r]: elementwise, a 2-D grid of (row block, column block) tiles.
    With ALIGNED the column blocks tile the rows' aligned bodies, and column block 0 also writes
    the edges."""
    d = tl.cast(drainage_idx, tl.int32)
    block = tl.program_id(0).to(tl.int64)
    rows, row_ok, img, pix = _rows_of_block(
        block, n_rows, S, blocks_per_image, BLOCK_ROWS, ROWS_MODE, INDEX32
    )
    x_row = img * x_stride_n + pix * x_stride_s
    g_row = x_row if SAME_OFFSETS else img * g_stride_n + pix * g_stride_s

    t_raw = tl.load(T_ptr + rows * t_stride, mask=row_ok, other=ignore_index).to(tl.int64)
    kept = t_raw != ignore_index
    t = tl.where(kept & (t_raw >= 0) & (t_raw < K), t_raw, -1).to(tl.int32)
    shift = tl.load(Stats_ptr + rows, mask=row_ok, other=0.0).to(COMPUTE)
    n_rows64 = tl.cast(n_rows, tl.int64)  # 3 * n_rows passes 2^31 above ~715M rows
    c = tl.load(Stats_ptr + n_rows64 + rows, mask=row_ok, other=0.0).to(COMPUTE)
    g_t = tl.load(Stats_ptr + 2 * n_rows64 + rows, mask=row_ok, other=0.0).to(COMPUTE)
    g_d = tl.load(Stats_ptr + 3 * n_rows64 + rows, mask=row_ok, other=0.0).to(COMPUTE)
    dy = tl.load(DY_ptr + rows * dy_stride, mask=row_ok, other=0.0).to(COMPUTE)

    jj = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if ALIGNED:
        body, head, n_body = _aligned_body(x_row, K, V)
        g_body = body if SAME_OFFSETS else g_row + head
        in_body = row_ok[:, None] & (jj[None, :] < n_body[:, None])
        x = tl.load(X_ptr + body[:, None] + jj[None, :], mask=in_body, other=NEG_INF).to(COMPUTE)
        t_body, d_body = _in_body(t, head, n_body), _in_body(d, head, n_body)
        g = _grad_tile(_exp_sub(x, shift[:, None]), jj, t_body, d_body, c, g_t, g_d, kept, dy)
        tl.store(G_ptr + g_body[:, None] + jj[None, :], g.to(G_ptr.dtype.element_ty), mask=in_body)
        if tl.program_id(1) == 0:
            e_cols, e_ok = _edge_columns(head, n_body, K, row_ok, V)
            x_edge = tl.load(X_ptr + x_row[:, None] + e_cols, mask=e_ok, other=NEG_INF).to(COMPUTE)
            g_edge = _grad_tile(_exp_sub(x_edge, shift[:, None]), e_cols, t, d, c, g_t, g_d, kept, dy)
            tl.store(G_ptr + g_row[:, None] + e_cols, g_edge.to(G_ptr.dtype.element_ty), mask=e_ok)
    else:
        x = _load_tile(X_ptr, x_row, row_ok, jj, K, x_stride_k, COMPUTE)
        g = _grad_tile(_exp_sub(x, shift[:, None]), jj, t, d, c, g_t, g_d, kept, dy)
        _store_tile(G_ptr, g, g_row, row_ok, jj, K, g_stride_k)


@triton.jit
def _scale_grad_kernel(G_ptr, Scale_ptr, numel, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """G *= scale in place, grid-stride; reads nothing but the scalar when scale == 1.

    The gradient written in the forward is handed out by the backward, scaled by the upstream
    gradient. That scalar is 1 for a plain loss.backward(): testing it on the device (not with
    .item()) skips the whole pass without a host synchronisation.
    """
    scale = tl.load(Scale_ptr).to(COMPUTE)
    if scale != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for block_start in tl.range(start, numel, step):
            offs = block_start + tl.arange(0, BLOCK)
            mask = offs < numel
            g = tl.load(G_ptr + offs, mask=mask).to(COMPUTE)
            tl.store(G_ptr + offs, (g * scale).to(G_ptr.dtype.element_ty), mask=mask)
