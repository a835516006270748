// CUDA kernels of the drainage loss, with the contract of the Triton kernels: fp32 math (fp64 for
// fp64 logits), int64 offsets, any row stride, no host synchronisation (the mean's count and the
// upstream scale are read on the device), deterministic (no float atomics; fixed reduction trees).
//
// Layouts (config_for):
//   * short rows, K <= kWarpRowMaxK: TPR = 4, 8, 16 or 32 lanes per row (the smallest with
//     TPR * kElemsPerLane >= K), 256 threads, 256 / TPR rows per block: one warp per row from
//     K = 513, several rows per warp below. A row is reduced with shuffles inside its lane group;
//     the butterfly leaves (m, s) in every lane, and the group's lanes evaluate the row terms
//     together: one warp instruction stream per 32 / TPR rows (a single lane computing them would
//     issue the same warp instructions, plus the shuffles to broadcast the result).
//   * long rows: one block per row (TPR = 0 below), reduced in two levels, shuffles within each
//     warp, then warp 0 merges the per-warp partials, evaluates the row terms once and hands them
//     to the block through shared memory.
// Rows of unit stride are read in 16-byte vectors; with an odd K a row starts anywhere, so the
// elements before its first 16-byte boundary (the head) and after its last one (the tail) are read
// singly.
//
// Members (row_math.h): the member is a runtime argument (ForwardArgs.hp), not a template parameter:
// one kernel per layout and dtype serves every member, and a DAC alpha that changes every epoch
// compiles nothing. The members' row terms are one switch in the row-terms step, evaluated once per
// row (by its lane group, or warp 0); the passes over the row are the same for all.
// Sample weights: the forward reads w_r (any float dtype and stride) and gives the weighted loss
// w_r l_r and its row terms; it checks every weight (finite, >= 0) as it checks the targets.
//
// Reduced forward (forward_reduced, the mean / sum path): the forward kernel writes one partial per
// block (its rows' loss sum and kept rows' weight sum in fp64, kept rows, bad targets and weights),
// a one-block finalize kernel sums them in a fixed order, asserts on the device that no target and no
// weight was bad, and writes the loss and 1 / divisor (the count, or the weight sum). The backward
// is one scale kernel (scale_by_) that returns at once when its factor is exactly 1.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../drainage_common.h"

// The device-side assert's message: _inputs.TARGET_MESSAGE (a literal: device code cannot take the
// address of a host array).
#define DRAINAGE_TARGET_MESSAGE \
  "drainage_fast: every target must be in [0, K) and != drainage_idx, or == ignore_index"
// _inputs.WEIGHT_MESSAGE.
#define DRAINAGE_WEIGHT_MESSAGE "drainage_fast: every sample_weight must be finite and >= 0"

namespace drainage::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;  // threads per block for short rows (and the scale kernel)
// Short-row blocks: at least 2 resident per SM, so ptxas may use 65536 / (2 * 256) = 128 registers a
// thread (a bound of 1024 threads, or of 256 threads x 4 blocks, would cap them at 64).
constexpr int kShortMinBlocks = 2;
constexpr int64_t kWarpRowMaxK = 2048;  // longest rows given to one warp (or less); longer: a block
constexpr int64_t kElemsPerLane = 32;  // short rows: lanes per row so that each reads <= 32 (<= 64 at 2048)
constexpr int kPacksPerLane = 4;  // long rows: 16-byte loads per thread and row, before more threads
constexpr int kFinalizeThreads = 256;

// exp2 is the native instruction: exp(x) = exp2(x * log2 e), as in the Triton kernels.
__device__ __forceinline__ float fast_exp(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double fast_exp(double x) { return ::exp(x); }

// Online log-sum-exp state: m = max seen, s = sum of exp(z - m).
template <typename T>
struct MaxSum {
  T m, s;
};

// exp(x - m), and 1 where x == m: two +inf logits in a row give s = 2, not exp(inf - inf) = nan.
template <typename T>
__device__ __forceinline__ T exp_sub(T x, T m) {
  return x == m ? T(1) : fast_exp(x - m);
}

template <typename T>
__device__ __forceinline__ void add(MaxSum<T>& a, T z) {
  if (z > a.m) {
    a.s = a.s * fast_exp(a.m - z) + T(1);  // a.m = -inf: exp(-inf) = 0
    a.m = z;
  } else if (z != neg_inf<T>()) {
    a.s += exp_sub(z, a.m);  // a NaN lands here and poisons s; m never holds a NaN
  }
}

template <typename T>
__device__ __forceinline__ MaxSum<T> merge(MaxSum<T> a, MaxSum<T> b) {
  const T m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<T>()) return {m, a.s + b.s};  // nothing but -inf yet: no -inf - -inf
  return {m, a.s * exp_sub(a.m, m) + b.s * exp_sub(b.m, m)};
}

// Butterfly over `width` lanes: merge is commutative, so every lane ends with the same bits.
template <typename T>
__device__ __forceinline__ MaxSum<T> warp_reduce(MaxSum<T> v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    const MaxSum<T> other = {__shfl_xor_sync(0xffffffffu, v.m, offset, width),
                             __shfl_xor_sync(0xffffffffu, v.s, offset, width)};
    v = merge(v, other);
  }
  return v;
}

// The row's (m, s) in every thread of its group. TPR = 0: the group is the whole block.
template <int TPR, typename T>
__device__ __forceinline__ MaxSum<T> row_reduce(MaxSum<T> v, MaxSum<T>* partials) {
  if constexpr (TPR > 0) {
    return warp_reduce(v, TPR);
  } else {
    v = warp_reduce(v, kWarp);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (lane == 0) partials[warp] = v;
    __syncthreads();
    // Every warp reduces the per-warp partials itself: no second barrier to broadcast a result.
    const bool has = lane < static_cast<int>(blockDim.x / kWarp);
    v = warp_reduce(has ? partials[lane] : MaxSum<T>{neg_inf<T>(), T(0)}, kWarp);
    __syncthreads();  // `partials` is written again for the next row
    return v;
  }
}

template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t v[16 / sizeof(scalar_t)];
};

// Elements before the first 16-byte boundary of a row that starts at p (at most K).
template <typename scalar_t>
__device__ __forceinline__ int64_t head_of(const scalar_t* p, int64_t K) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int misalign = static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(scalar_t)) % V);
  return misalign == 0 ? 0 : std::min<int64_t>(K, V - misalign);
}

// f(k, x_k) for the outputs k of row x that this lane owns.
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_each_in_row(const scalar_t* x, int64_t K, int64_t stride_k, int lane,
                                                int lanes, F&& f) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (stride_k != 1) {
    for (int64_t k = lane; k < K; k += lanes) f(k, x[k * stride_k]);
    return;
  }
  const int64_t head = head_of(x, K);
  const int64_t n_packs = (K - head) / V;
  const auto* packs = reinterpret_cast<const Pack<scalar_t>*>(x + head);
  for (int64_t k = lane; k < head; k += lanes) f(k, x[k]);
  for (int64_t i = lane; i < n_packs; i += lanes) {
    const Pack<scalar_t> p = packs[i];
#pragma unroll
    for (int j = 0; j < V; ++j) f(head + i * V + j, p.v[j]);
  }
  for (int64_t k = head + n_packs * V + lane; k < K; k += lanes) f(k, x[k]);
}

// g_k = grad_of(k, x_k) over row k of this lane; vectors when input and output rows have unit
// stride and the same alignment (a dense gradient of a dense input: always).
template <typename scalar_t, typename T, typename F>
__device__ __forceinline__ void write_row(const scalar_t* x, scalar_t* g, int64_t K, int64_t x_stride,
                                          int64_t g_stride, int lane, int lanes, F&& grad_of) {
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vectors = x_stride == 1 && g_stride == 1 &&
                       reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(g) % 16;
  if (!vectors) {
    for (int64_t k = lane; k < K; k += lanes)
      g[k * g_stride] = static_cast<scalar_t>(grad_of(k, static_cast<T>(x[k * x_stride])));
    return;
  }
  const int64_t head = head_of(x, K);
  const int64_t n_packs = (K - head) / V;
  const auto* x_packs = reinterpret_cast<const Pack<scalar_t>*>(x + head);
  auto* g_packs = reinterpret_cast<Pack<scalar_t>*>(g + head);
  for (int64_t k = lane; k < head; k += lanes) g[k] = static_cast<scalar_t>(grad_of(k, static_cast<T>(x[k])));
  for (int64_t i = lane; i < n_packs; i += lanes) {
    const Pack<scalar_t> in = x_packs[i];
    Pack<scalar_t> out;
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = static_cast<scalar_t>(grad_of(head + i * V + j, static_cast<T>(in.v[j])));
    g_packs[i] = out;
  }
  for (int64_t k = head + n_packs * V + lane; k < K; k += lanes)
    g[k] = static_cast<scalar_t>(grad_of(k, static_cast<T>(x[k])));
}

// scale * the gradient of one element given the row terms: the one expression of both the fused
// forward and the backward. The order of the operations is part of the contract (backend_contract
// "bits"): g = exp(z - shift) * c first, then g * scale, two separate multiplies (nvcc never contracts
// two multiplies), so that the fused gradient (scale 1: g * 1 == g) followed by scale_by_'s g * s has
// the bits of a recompute with grad_rows = s. `kept` is a select, so ignored rows with inf or nan
// logits still give exactly 0. exp_sub, as the Triton kernels: exp(0) where z == shift, also for +inf.
template <typename T>
__device__ __forceinline__ T grad_element(int64_t k, T z, int64_t t, int64_t d, const RowTerms<T>& terms,
                                          bool kept, T scale) {
  const T g = k == t ? terms.g_t : (k == d ? terms.g_d : exp_sub(z, terms.shift) * terms.c);
  return kept ? g * scale : T(0);
}

// The sums of the reduced forward: its rows' losses and the kept rows' sample weights (the divisor
// of a weighted mean; fp64 for every logits dtype: a handful of adds per thread, no rounding drift),
// the kept rows (target != ignore_index), the bad targets among them, and the rows whose weight is
// not finite or < 0. I: int32 in the partial of a block, int64 over the blocks.
template <typename I>
struct Sums {
  double loss, weight;
  I kept, bad, bad_weight;
};
using BlockPartial = Sums<int32_t>;  // one per block
static_assert(sizeof(BlockPartial) == 32, "BlockPartial is read as 32-byte records");

template <typename I, typename J>
__device__ __forceinline__ Sums<I> operator+(const Sums<I>& a, const Sums<J>& b) {
  return {a.loss + b.loss, a.weight + b.weight, a.kept + b.kept, a.bad + b.bad, a.bad_weight + b.bad_weight};
}

// The sums of a block's threads, in thread 0, in a fixed tree: shuffles down within each warp, then
// the warps in order. The warps' sums wait in shared memory a field an array (an array of Sums
// records took the block-per-row forward past its 64 registers, 32-48 bytes of stack, nvcc 13.0).
template <int kMaxWarps, typename I>
__device__ __forceinline__ Sums<I> block_sum(Sums<I> v) {
  __shared__ double loss[kMaxWarps], weight[kMaxWarps];
  __shared__ I kept[kMaxWarps], bad[kMaxWarps], bad_weight[kMaxWarps];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v.loss += __shfl_down_sync(0xffffffffu, v.loss, offset);
    v.weight += __shfl_down_sync(0xffffffffu, v.weight, offset);
    v.kept += __shfl_down_sync(0xffffffffu, v.kept, offset);
    v.bad += __shfl_down_sync(0xffffffffu, v.bad, offset);
    v.bad_weight += __shfl_down_sync(0xffffffffu, v.bad_weight, offset);
  }
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    loss[warp] = v.loss, weight[warp] = v.weight, kept[warp] = v.kept, bad[warp] = v.bad;
    bad_weight[warp] = v.bad_weight;
  }
  __syncthreads();
  Sums<I> total = {};
  for (int w = 0; threadIdx.x == 0 && w < static_cast<int>(blockDim.x / kWarp); ++w) {
    total = total + Sums<I>{loss[w], weight[w], kept[w], bad[w], bad_weight[w]};
  }
  return total;
}

struct ForwardArgs {
  const void* x;
  TargetView target;
  void* loss;  // (R,) T; null: not written (forward_reduced)
  void* stats;  // (kRowTerms, R) T; null: not written (forward_reduced)
  void* grad;  // null: no gradient (plain forward)
  const void* scale;  // one T, the gradient's factor (1 / count for a mean); null: 1
  BlockPartial* partials;  // gridDim.x records (forward_reduced); null: none
  RowLayout rows, g_rows;
  Hyper hp;  // the member (a runtime argument: one kernel serves them all), its h1, h2, the weights
};

// The row terms of row x (target t, (m, s) of its J, sample weight w) or, where the row does not
// count (compute false), skipped_row's.
template <typename T, typename scalar_t>
__device__ __forceinline__ RowTerms<T> terms_of(const ForwardArgs& a, const scalar_t* x, int64_t t, bool compute,
                                                bool bad, MaxSum<T> v, T w) {
  if (!compute) return skipped_row<T>(bad);
  const T z_t = static_cast<T>(x[t * a.rows.stride_k]), z_d = static_cast<T>(x[a.hp.drainage_idx * a.rows.stride_k]);
  const RowTerms<T> terms = row_terms<ScalarMath<T>>(a.hp.member, z_t, z_d, v.m, v.s, T(a.hp.h1), T(a.hp.h2));
  return a.hp.weight.ptr != nullptr ? weighted(terms, w) : terms;
}

// Launch bounds. A block-per-row kernel (TPR = 0) may get up to max_threads(sizeof(scalar_t))
// threads, so it must fit in 65536 / that many registers per thread (64 at 1024); without the bound
// ptxas is free to take more and such a launch fails. fp64's row math spilled 20 bytes at 64
// registers, so fp64 blocks stop at 512 threads (128 registers). The second bound (1 block per SM at
// least) lets ptxas use that room: with the first alone it still stopped at 64 registers and spilled
// 8-28 bytes (nvcc 13.0, sm_90). Short-row kernels (TPR > 0) always run kBlock = 256 threads with at
// least kShortMinBlocks = 2 blocks per SM: 65536 / 512 = 128 registers, not 64. The forward of the
// 2- and 4-byte dtypes asks for 4 blocks (64 registers, as many resident blocks as before the
// members): allowed 128, ptxas took 84-96 for it (nvcc 13.0, sm_90), which would halve the blocks
// per SM; at 64 it spills nothing. fp64's forward spills 32 bytes at 64 registers, so it keeps 2.
constexpr int max_threads(int64_t elem_size) { return elem_size == 8 ? 512 : 1024; }

template <typename scalar_t, int TPR>
constexpr int bound_threads() {
  return TPR > 0 ? kBlock : max_threads(sizeof(scalar_t));
}

template <int TPR>
constexpr int bound_blocks() {
  return TPR > 0 ? kShortMinBlocks : 1;
}

template <typename scalar_t, int TPR>
constexpr int forward_bound_blocks() {
  return TPR > 0 && sizeof(scalar_t) < 8 ? 2 * kShortMinBlocks : bound_blocks<TPR>();
}

template <typename scalar_t, int TPR>
__global__ void __launch_bounds__(bound_threads<scalar_t, TPR>(), forward_bound_blocks<scalar_t, TPR>())
    drainage_fwd_kernel(ForwardArgs a) {
  using T = at::opmath_type<scalar_t>;
  static_assert(TPR == 0 || (TPR >= 4 && TPR <= kWarp && kBlock % (TPR > 0 ? TPR : 1) == 0), "lanes per row");
  __shared__ MaxSum<T> warp_sums[kWarp];  // block-per-row: one (m, s) per warp
  __shared__ RowTerms<T> block_terms;  // block-per-row: warp 0's row terms for the whole block
  const int lanes = TPR > 0 ? TPR : blockDim.x;
  const int lane = threadIdx.x % lanes, rows_per_block = blockDim.x / lanes;
  const int warp = threadIdx.x / kWarp, warp_lane = threadIdx.x % kWarp;
  const int64_t R = a.rows.R, K = a.rows.K, d = a.hp.drainage_idx, ignore_index = a.hp.ignore_index;
  const bool weighted = a.hp.weight.ptr != nullptr;
  const auto* X = static_cast<const scalar_t*>(a.x);
  T* loss = static_cast<T*>(a.loss);
  T* stats = static_cast<T*>(a.stats);
  // This thread's share of the block partial (lane 0 of each row group owns its rows).
  double loss_sum = 0.0, weight_sum = 0.0;
  int kept_rows = 0, bad_rows = 0, bad_weights = 0;

  // Grid-stride over row groups; the loop condition is the same for the whole block, so every
  // thread reaches every __syncthreads below the same number of times.
  for (int64_t base = int64_t(blockIdx.x) * rows_per_block; base < R; base += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = base + threadIdx.x / lanes;  // TPR = 0: the same row in the whole block
    const bool row_ok = r < R;
    const int64_t t = row_ok ? a.target[r] : ignore_index;
    const TargetCheck check = check_target(t, K, d, ignore_index);
    // The lanes of a row read the same weight: one transaction.
    const T w = row_ok && weighted ? a.hp.weight.at<T>(r) : T(1);
    const bool compute = row_ok && check.kept && !check.bad;
    const scalar_t* x = X + (row_ok ? a.rows.start(r) : 0);

    MaxSum<T> acc = {neg_inf<T>(), T(0)};
    if (compute) {
      for_each_in_row(x, K, a.rows.stride_k, lane, lanes, [&](int64_t k, scalar_t v) {
        if (k != t && k != d) add(acc, static_cast<T>(v));
      });
    }

    RowTerms<T> terms;
    if constexpr (TPR > 0) {
      // Every lane of the warp takes part (no early exit above): full-mask shuffles are safe.
      acc = warp_reduce(acc, TPR);
      terms = terms_of(a, x, t, compute, check.bad, acc, w);
    } else {
      acc = warp_reduce(acc, kWarp);
      if (warp_lane == 0) warp_sums[warp] = acc;
      __syncthreads();  // (1) the per-warp sums are in shared memory
      if (warp == 0) {
        // The row terms once per row, by warp 0 (compute is uniform across the block).
        const bool has = warp_lane < static_cast<int>(blockDim.x / kWarp);
        const MaxSum<T> v = warp_reduce(has ? warp_sums[warp_lane] : MaxSum<T>{neg_inf<T>(), T(0)}, kWarp);
        const RowTerms<T> row = terms_of(a, x, t, compute, check.bad, v, w);
        if (warp_lane == 0) block_terms = row;
      }
      // (2) block_terms is written, and warp 0 has read warp_sums: the next row may overwrite them.
      // block_terms itself is written again only after the next row's barrier (1), which no thread
      // passes before it has read this copy.
      __syncthreads();
      terms = block_terms;
    }

    if (row_ok && lane == 0) {
      if (loss != nullptr) loss[r] = terms.loss;
      if (stats != nullptr) {
        stats[r] = terms.shift;
        stats[R + r] = terms.c;
        stats[2 * R + r] = terms.g_t;
        stats[3 * R + r] = terms.g_d;
      }
      if (check.kept) {
        loss_sum += static_cast<double>(terms.loss);
        weight_sum += static_cast<double>(w);
        ++kept_rows;
      }
      bad_rows += check.bad ? 1 : 0;
      bad_weights += w >= T(0) && isfinite(w) ? 0 : 1;  // nan: not >= 0
    }
    // forward_grad_ writes the gradient over the logits: the lanes of a row must all have read z_t
    // and z_d (terms_of) before any of them stores there (the block-per-row path's barrier (2)
    // already orders them).
    if constexpr (TPR > 0) __syncwarp();
    if (a.grad != nullptr && row_ok) {
      // The row was just read: this second read mostly hits L1 / L2, so DRAM sees one read and
      // one write of the logits for the whole forward + backward.
      const T scale = a.scale != nullptr ? *static_cast<const T*>(a.scale) : T(1);
      scalar_t* g = static_cast<scalar_t*>(a.grad) + a.g_rows.start(r);
      write_row<scalar_t, T>(x, g, K, a.rows.stride_k, a.g_rows.stride_k, lane, lanes, [&](int64_t k, T z) {
        return grad_element(k, z, t, d, terms, check.kept, scale);
      });
    }
  }

  if (a.partials == nullptr) {
    // forward / forward_with_grad check the targets and weights here, as forward_reduced's finalize
    // does: a device-side assert (no host sync), once per block (one thread), not once per bad row.
    if (__syncthreads_or(bad_rows > 0) && threadIdx.x == 0) CUDA_KERNEL_ASSERT_MSG(false, DRAINAGE_TARGET_MESSAGE);
    if (__syncthreads_or(bad_weights > 0) && threadIdx.x == 0) CUDA_KERNEL_ASSERT_MSG(false, DRAINAGE_WEIGHT_MESSAGE);
    return;
  }
  // forward_reduced: one partial per block (thread 0 writes it once the whole block is here).
  const BlockPartial p = block_sum<kWarp>(BlockPartial{loss_sum, weight_sum, kept_rows, bad_rows, bad_weights});
  if (threadIdx.x == 0) a.partials[blockIdx.x] = p;
}

// The reduced forward's second launch: one block sums the n partials in a fixed order (a strided
// sequential pass per thread, then a fixed tree), asserts that no target and no weight was bad (the
// device-side checks: no host sync), and writes out = sum (or sum / divisor for a mean) and
// inv_count = 1 / divisor (mean only; inv_count null otherwise), the divisor being the kept count or,
// weighted, the kept rows' weight sum. divisor = 0: a mean is 0 / 0 = nan and 1 / divisor = inf, as
// the contract asks.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) drainage_finalize_kernel(const BlockPartial* partials,
                                                                              int64_t n, T* out, T* inv_count,
                                                                              bool mean, bool weighted) {
  Sums<long long> mine = {};
  for (int64_t i = threadIdx.x; i < n; i += kFinalizeThreads) mine = mine + partials[i];
  const Sums<long long> all = block_sum<kFinalizeThreads / kWarp>(mine);
  if (threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT_MSG(all.bad == 0, DRAINAGE_TARGET_MESSAGE);
    CUDA_KERNEL_ASSERT_MSG(all.bad_weight == 0, DRAINAGE_WEIGHT_MESSAGE);
    const T total = static_cast<T>(all.loss);
    const T divisor = weighted ? static_cast<T>(all.weight) : static_cast<T>(all.kept);
    *out = mean ? total / divisor : total;
    if (inv_count != nullptr) *inv_count = T(1) / divisor;
  }
}

struct BackwardArgs {
  const void* x;
  TargetView target;
  const void* stats;  // (kRowTerms, R) T
  const void* grad_rows;  // (R,) T, any stride (0: a broadcast scalar)
  int64_t grad_rows_stride;
  void* grad;
  RowLayout rows, g_rows;
  int64_t drainage_idx, ignore_index;
};

template <typename scalar_t, int TPR>
__global__ void __launch_bounds__(bound_threads<scalar_t, TPR>(), bound_blocks<TPR>())
    drainage_bwd_kernel(BackwardArgs a) {
  using T = at::opmath_type<scalar_t>;
  const int lanes = TPR > 0 ? TPR : blockDim.x;
  const int lane = threadIdx.x % lanes, rows_per_block = blockDim.x / lanes;
  const int64_t R = a.rows.R, K = a.rows.K;
  const T* stats = static_cast<const T*>(a.stats);
  const T* dy = static_cast<const T*>(a.grad_rows);

  for (int64_t base = int64_t(blockIdx.x) * rows_per_block; base < R; base += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = base + threadIdx.x / lanes;
    if (r >= R) continue;  // no block-wide step below: a thread may leave early
    const int64_t t = a.target[r];
    const bool kept = t != a.ignore_index;
    const RowTerms<T> terms = {T(0), stats[r], stats[R + r], stats[2 * R + r], stats[3 * R + r]};
    const T scale = dy[r * a.grad_rows_stride];
    const auto* x = static_cast<const scalar_t*>(a.x) + a.rows.start(r);
    scalar_t* g = static_cast<scalar_t*>(a.grad) + a.g_rows.start(r);
    write_row<scalar_t, T>(x, g, K, a.rows.stride_k, a.g_rows.stride_k, lane, lanes, [&](int64_t k, T z) {
      return grad_element(k, z, t, a.drainage_idx, terms, kept, scale);
    });
  }
}

// g *= s in place, s = grad_out * pending (pending null: 1) in the compute type T (the loss dtype);
// each element becomes scalar_t(T(g) * s). Returns at once when s == 1 (loss.backward() of a sum):
// decided on the device, no host sync. pending is 1 / count of a mean: infinite only when no row was
// counted, and then the gradient is exactly 0 and stays so (g * inf would make it nan). g is dense
// from its data pointer on (empty_like of a dense tensor): 16-byte vectors when that pointer is
// 16-byte aligned (always, from the caching allocator).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) drainage_scale_kernel(scalar_t* g, int64_t numel, const void* grad_out,
                                                              int grad_out_kind, const void* pending,
                                                              int pending_kind) {
  using T = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  T s = load_as<T>(grad_out, 0, grad_out_kind);
  if (pending != nullptr) {
    const T p = load_as<T>(pending, 0, pending_kind);
    if (isinf(p)) return;  // 1 / 0: every row ignored, the gradient is all zeros
    s = s * p;
  }
  if (s == T(1)) return;
  const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, step = int64_t(gridDim.x) * blockDim.x;
  const bool vectors = reinterpret_cast<uintptr_t>(g) % 16 == 0;
  const int64_t n_packs = vectors ? numel / V : 0;
  auto* packs = reinterpret_cast<Pack<scalar_t>*>(g);
  for (int64_t i = start; i < n_packs; i += step) {
    Pack<scalar_t> p = packs[i];
#pragma unroll
    for (int j = 0; j < V; ++j) p.v[j] = static_cast<scalar_t>(static_cast<T>(p.v[j]) * s);
    packs[i] = p;
  }
  for (int64_t i = n_packs * V + start; i < numel; i += step) g[i] = static_cast<scalar_t>(static_cast<T>(g[i]) * s);
}

struct Config {
  int tpr;  // threads per row; 0: one block per row
  int threads;
  int64_t blocks;
};

int sm_count(const at::Tensor& t) {
  // Cached per device: the attribute query is host time on every call otherwise.
  static std::atomic<int> cache[64];
  const int device = t.device().index();
  if (device >= 0 && device < 64) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Short rows (K <= kWarpRowMaxK): the fewest lanes per row (4..32) that read at most kElemsPerLane
// elements each, 32 lanes (one warp) from K = 513 on: 64, 32, 16 or 8 rows per 256-thread block.
// Long rows: one block per row, enough threads that each loads about kPacksPerLane 16-byte vectors.
// The row terms of a row do not depend on the grid (only on its lanes), so forward, forward_with_grad
// and forward_reduced give the same per-row bits.
Config config_for(int64_t R, int64_t K, int64_t elem_size, int sms) {
  const int64_t max_blocks = int64_t(sms) * 32;  // the grid-stride loops cover the rest
  if (K <= kWarpRowMaxK) {
    int tpr = 4;
    while (tpr < kWarp && int64_t(tpr) * kElemsPerLane < K) tpr *= 2;
    const int rows_per_block = kBlock / tpr;
    return {tpr, kBlock, std::min((R + rows_per_block - 1) / rows_per_block, max_blocks)};
  }
  const int64_t per_lane = kPacksPerLane * (16 / elem_size);
  int threads = 2 * kWarp;
  while (threads < max_threads(elem_size) && int64_t(threads) * per_lane < K) threads *= 2;
  return {0, threads, std::min(R, max_blocks)};
}

// The kernels as classes, so that `launch` can pick the threads-per-row instance at run time.
template <typename scalar_t, int TPR>
struct ForwardKernel {
  static void run(dim3 grid, dim3 block, cudaStream_t stream, const ForwardArgs& a) {
    drainage_fwd_kernel<scalar_t, TPR><<<grid, block, 0, stream>>>(a);
  }
};

template <typename scalar_t, int TPR>
struct BackwardKernel {
  static void run(dim3 grid, dim3 block, cudaStream_t stream, const BackwardArgs& a) {
    drainage_bwd_kernel<scalar_t, TPR><<<grid, block, 0, stream>>>(a);
  }
};

template <template <typename, int> class Kernel, typename scalar_t, typename Args>
void launch(const Config& c, const Args& args) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(c.blocks)), block(c.threads);
  switch (c.tpr) {
    case 4: Kernel<scalar_t, 4>::run(grid, block, stream, args); break;
    case 8: Kernel<scalar_t, 8>::run(grid, block, stream, args); break;
    case 16: Kernel<scalar_t, 16>::run(grid, block, stream, args); break;
    case 32: Kernel<scalar_t, 32>::run(grid, block, stream, args); break;
    default: Kernel<scalar_t, 0>::run(grid, block, stream, args); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_device(const at::Tensor& x3) {
  TORCH_CHECK(x3.is_cuda(), "drainage_fast: the CUDA kernels need CUDA tensors, got ", x3.device());
}

// check_forward's checks, on CUDA tensors.
Hyper check_cuda_forward(const at::Tensor& x3, const at::Tensor& target, double h1, double h2, int64_t drainage_idx,
                         int64_t ignore_index, int64_t member, const std::optional<at::Tensor>& weight) {
  check_device(x3);
  return check_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
}

// The forward kernel for forward, forward_with_grad and forward_reduced: loss / stats / grad /
// scale / partials as in ForwardArgs (an undefined tensor or a null pointer: not written / 1).
void run_forward(const at::Tensor& x3, const at::Tensor& target, const Hyper& hp, const at::Tensor& loss,
                 const at::Tensor& stats, const at::Tensor& grad, const void* scale, BlockPartial* partials,
                 const Config& config) {
  const RowLayout rows = layout_of(x3);
  if (rows.R == 0) return;
  ForwardArgs args{x3.data_ptr(),
                   target_view(target),
                   loss.defined() ? loss.data_ptr() : nullptr,
                   stats.defined() ? stats.data_ptr() : nullptr,
                   grad.defined() ? grad.data_ptr() : nullptr,
                   scale,
                   partials,
                   rows,
                   grad.defined() ? layout_of(grad) : rows,
                   hp};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_forward_cuda", [&] {
    launch<ForwardKernel, scalar_t>(config, args);
  });
}

Config config_of(const at::Tensor& x3) {
  const RowLayout rows = layout_of(x3);
  return config_for(rows.R, rows.K, x3.element_size(), sm_count(x3));
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x3, const at::Tensor& target, double h1,
                                                double h2, int64_t drainage_idx, int64_t ignore_index,
                                                int64_t member, const std::optional<at::Tensor>& weight) {
  const Hyper hp = check_cuda_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
  const c10::cuda::CUDAGuard guard(x3.device());
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts), stats = at::empty({kRowTerms, R}, opts);
  run_forward(x3, target, hp, loss, stats, at::Tensor(), nullptr, nullptr, config_of(x3));
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_with_grad_cuda(
    const at::Tensor& x3, const at::Tensor& target, const std::optional<at::Tensor>& scale, double h1, double h2,
    int64_t drainage_idx, int64_t ignore_index, int64_t member, const std::optional<at::Tensor>& weight) {
  const Hyper hp = check_cuda_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
  check_scale(x3, scale);
  const c10::cuda::CUDAGuard guard(x3.device());
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts), stats = at::empty({kRowTerms, R}, opts);
  at::Tensor grad = at::empty_like(x3);  // keeps a dense input's layout (e.g. channels_last)
  run_forward(x3, target, hp, loss, stats, grad, scale.has_value() ? scale->const_data_ptr() : nullptr, nullptr,
              config_of(x3));
  return {loss, stats, grad};
}

// The row losses, and x3 overwritten with the gradient of their sum, in one launch: each element
// is read and then written by the same thread, and z_t / z_d are read by every lane of a row before
// the warp's (or block's) barrier that precedes the stores. Targets and weights: the device assert.
at::Tensor forward_grad_cuda(at::Tensor& x3, const at::Tensor& target, double h1, double h2, int64_t drainage_idx,
                             int64_t ignore_index, int64_t member, const std::optional<at::Tensor>& weight) {
  const Hyper hp = check_cuda_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
  at::assert_no_internal_overlap(x3);  // an expanded view: several rows would write one memory
  if (weight.has_value()) at::assert_no_overlap(x3, *weight);
  const c10::cuda::CUDAGuard guard(x3.device());
  at::Tensor loss = at::empty({x3.size(0) * x3.size(1)}, x3.options().dtype(loss_type(x3)));
  run_forward(x3, target, hp, loss, at::Tensor(), x3, nullptr, nullptr, config_of(x3));
  return loss;
}

// The mean / sum forward in two launches and no host sync: the forward kernel (per-block partials,
// the gradient of the summed (weighted) loss when with_grad, no per-row output) and the one-block
// finalize (the target and weight asserts, out, inv_count). out: 0-dim loss dtype; inv_count: (1,)
// when mean.
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> forward_reduced_cuda(
    const at::Tensor& x3, const at::Tensor& target, bool mean, bool with_grad, double h1, double h2,
    int64_t drainage_idx, int64_t ignore_index, int64_t member, const std::optional<at::Tensor>& weight) {
  const Hyper hp = check_cuda_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
  const c10::cuda::CUDAGuard guard(x3.device());
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor out = at::empty({}, opts);
  std::optional<at::Tensor> inv_count, grad;
  if (mean) inv_count = at::empty({1}, opts);
  if (with_grad) grad = at::empty_like(x3);  // keeps a dense input's layout (e.g. channels_last)
  const Config config = config_of(x3);
  const int64_t n_partials = layout_of(x3).R == 0 ? 0 : config.blocks;
  // One byte buffer of n_partials 32-byte records (the allocator aligns it to far more than 16).
  at::Tensor work = at::empty({std::max<int64_t>(n_partials, 1) * int64_t(sizeof(BlockPartial))},
                              x3.options().dtype(at::kByte));
  auto* partials = reinterpret_cast<BlockPartial*>(work.data_ptr());
  run_forward(x3, target, hp, at::Tensor(), at::Tensor(), grad.has_value() ? *grad : at::Tensor(), nullptr, partials,
              config);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "drainage_finalize_cuda", [&] {
    drainage_finalize_kernel<scalar_t><<<1, kFinalizeThreads, 0, stream>>>(
        partials, n_partials, out.data_ptr<scalar_t>(),
        inv_count.has_value() ? inv_count->data_ptr<scalar_t>() : nullptr, mean, hp.weight.ptr != nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, inv_count, grad};
}

at::Tensor backward_cuda(const at::Tensor& x3, const at::Tensor& target, const at::Tensor& stats,
                         const at::Tensor& grad_rows, int64_t drainage_idx, int64_t ignore_index) {
  check_device(x3);
  check_rows(x3, target);
  check_drainage_idx(drainage_idx, x3.size(2));
  check_stats(x3, stats, grad_rows);
  const c10::cuda::CUDAGuard guard(x3.device());
  at::Tensor grad = at::empty_like(x3);
  const RowLayout rows = layout_of(x3);
  if (rows.R == 0) return grad;
  // A dtype conversion is one more small kernel on the stream, never a host sync.
  const at::Tensor dy = grad_rows.scalar_type() == stats.scalar_type() ? grad_rows : grad_rows.to(stats.scalar_type());
  BackwardArgs args{x3.data_ptr(), target_view(target), stats.data_ptr(), dy.data_ptr(), dy.stride(0),
                    grad.data_ptr(), rows, layout_of(grad), drainage_idx, ignore_index};
  const Config config = config_for(rows.R, rows.K, x3.element_size(), sm_count(x3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_backward_cuda", [&] {
    launch<BackwardKernel, scalar_t>(config, args);
  });
  return grad;
}

void check_factor(const at::Tensor& grad, const at::Tensor& factor, const char* name) {
  TORCH_CHECK(factor.numel() == 1 && factor.device() == grad.device() && at::isFloatingType(factor.scalar_type()),
              "drainage_fast: ", name, " must be a one-element float tensor on ", grad.device(), ", got ",
              factor.numel(), " elements of ", factor.scalar_type(), " on ", factor.device());
}

// grad *= grad_out * pending in place (one launch; the kernel skips the pass when the factor is 1).
// grad comes from empty_like: dense, its numel elements fill one span from its data pointer.
void scale_by_cuda(const at::Tensor& grad, const at::Tensor& grad_out, const std::optional<at::Tensor>& pending) {
  check_device(grad);
  check_factor(grad, grad_out, "grad_out");
  if (pending.has_value()) check_factor(grad, *pending, "pending");
  TORCH_CHECK(grad.is_non_overlapping_and_dense(), "drainage_fast: scale_ needs a dense gradient");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble ||
                  grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16,
              "drainage_fast: the gradient must be float16, bfloat16, float32 or float64, got ", grad.scalar_type());
  const int64_t numel = grad.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((numel + kBlock - 1) / kBlock, int64_t(sm_count(grad)) * 8);
  const void* pending_ptr = pending.has_value() ? pending->const_data_ptr() : nullptr;
  const int pending_kind = pending.has_value() ? scalar_kind(*pending) : kKindFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "drainage_scale_cuda", [&] {
    drainage_scale_kernel<scalar_t><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
        grad.data_ptr<scalar_t>(), numel, grad_out.const_data_ptr(), scalar_kind(grad_out), pending_ptr,
        pending_kind);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The first op's form: grad *= scale (a one-element tensor of any float dtype).
void scale_cuda(const at::Tensor& grad, const at::Tensor& scale) { scale_by_cuda(grad, scale, std::nullopt); }

}  // namespace
}  // namespace drainage::cuda

TORCH_LIBRARY_IMPL(drainage_fast, CUDA, m) {
  m.impl("forward", &drainage::cuda::forward_cuda);
  m.impl("backward", &drainage::cuda::backward_cuda);
  m.impl("forward_with_grad", &drainage::cuda::forward_with_grad_cuda);
  m.impl("forward_grad_", &drainage::cuda::forward_grad_cuda);
  m.impl("scale_", &drainage::cuda::scale_cuda);
  m.impl("forward_reduced", &drainage::cuda::forward_reduced_cuda);
  m.impl("scale_by_", &drainage::cuda::scale_by_cuda);
}
