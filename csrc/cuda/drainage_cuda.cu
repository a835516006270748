// CUDA kernels of the drainage loss, with the contract of the Triton kernels: fp32 math (fp64 for
// fp64 logits), int64 offsets, any row stride, no host synchronisation (the mean's count and the
// upstream scale are read on the device), deterministic (no atomics; fixed reduction trees).
//
// Rows are handled by groups of TPR threads. Short rows: several rows per block (TPR in 4..32, one
// warp or less per row, reduced with shuffles). Long rows: one block per row (TPR = 0 below), reduced
// in two levels, shuffles within each warp and then across the warps through shared memory. Rows of
// unit stride are read in 16-byte vectors; with an odd K a row starts anywhere, so the elements
// before its first 16-byte boundary (the head) and after its last one (the tail) are read singly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../drainage_common.h"

namespace drainage::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;  // threads per block for short rows
constexpr int kPacksPerLane = 4;  // 16-byte loads per thread and row, before rows get more threads

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
// forward and the backward, so that both give the same bits. `kept` is a select, so ignored rows
// with inf or nan logits still give exactly 0.
template <typename T>
__device__ __forceinline__ T grad_element(int64_t k, T z, int64_t t, int64_t d, const RowTerms<T>& terms,
                                          bool kept, T scale) {
  const T g = k == t ? terms.g_t : (k == d ? terms.g_d : fast_exp(z - terms.shift) * terms.c);
  return kept ? g * scale : T(0);
}

struct ForwardArgs {
  const void* x;
  TargetView target;
  void* loss;  // (R,) T
  void* stats;  // (kRowTerms, R) T
  void* grad;  // null: no gradient (plain forward)
  const void* scale;  // one T, the gradient's factor (1 / count for a mean); null: 1
  RowLayout rows, g_rows;
  int64_t drainage_idx, ignore_index;
  double log_alpha, log_beta;
};

// Launch bounds: a block-per-row kernel may get up to max_threads(sizeof(scalar_t)) threads, so it
// must fit in 65536 / that many registers per thread (64 at 1024); without the bound ptxas is free
// to take more and such a launch fails. fp64's row math spilled 20 bytes at 64 registers, so fp64
// blocks stop at 512 threads. The second bound (1 block per SM at least) lets ptxas use that room:
// with the first alone it still stopped at 64 registers and spilled 8-28 bytes (nvcc 13.0, sm_90).
constexpr int max_threads(int64_t elem_size) { return elem_size == 8 ? 512 : 1024; }

template <typename scalar_t, int TPR>
__global__ void __launch_bounds__(max_threads(sizeof(scalar_t)), 1) drainage_fwd_kernel(ForwardArgs a) {
  using T = at::opmath_type<scalar_t>;
  __shared__ MaxSum<T> partials[kWarp];
  const int lanes = TPR > 0 ? TPR : blockDim.x;
  const int lane = threadIdx.x % lanes, rows_per_block = blockDim.x / lanes;
  const int64_t R = a.rows.R, K = a.rows.K, d = a.drainage_idx;
  const auto* X = static_cast<const scalar_t*>(a.x);
  T* loss = static_cast<T*>(a.loss);
  T* stats = static_cast<T*>(a.stats);

  // Grid-stride over row groups; the loop condition is the same for the whole block.
  for (int64_t base = int64_t(blockIdx.x) * rows_per_block; base < R; base += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = base + threadIdx.x / lanes;
    const bool row_ok = r < R;
    const int64_t t = row_ok ? a.target[r] : a.ignore_index;
    const TargetCheck check = check_target(t, K, d, a.ignore_index);
    const bool compute = row_ok && check.kept && !check.bad;
    const scalar_t* x = X + (row_ok ? a.rows.start(r) : 0);

    MaxSum<T> acc = {neg_inf<T>(), T(0)};
    if (compute) {
      for_each_in_row(x, K, a.rows.stride_k, lane, lanes, [&](int64_t k, scalar_t v) {
        if (k != t && k != d) add(acc, static_cast<T>(v));
      });
    }
    acc = row_reduce<TPR>(acc, partials);  // every thread of the block takes part

    RowTerms<T> terms = skipped_row<T>(check.bad);
    if (compute) {
      const T z_t = static_cast<T>(x[t * a.rows.stride_k]), z_d = static_cast<T>(x[d * a.rows.stride_k]);
      terms = row_terms(z_t, z_d, acc.m, acc.s, T(a.log_alpha), T(a.log_beta));
    }
    if (row_ok && lane == 0) {
      loss[r] = terms.loss;
      stats[r] = terms.shift;
      stats[R + r] = terms.c;
      stats[2 * R + r] = terms.g_t;
      stats[3 * R + r] = terms.g_d;
    }
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
__global__ void __launch_bounds__(max_threads(sizeof(scalar_t)), 1) drainage_bwd_kernel(BackwardArgs a) {
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

template <typename scalar_t>
__global__ void scale_kernel(scalar_t* g, const at::opmath_type<scalar_t>* scale, int64_t numel) {
  using T = at::opmath_type<scalar_t>;
  const T s = *scale;
  if (s == T(1)) return;  // the common case (loss.backward()): decided on the device, no host sync
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x)
    g[i] = static_cast<scalar_t>(static_cast<T>(g[i]) * s);
}

struct Config {
  int tpr;  // threads per row; 0: one block per row
  int threads;
  int64_t blocks;
};

int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()));
  return count;
}

// Enough threads per row that each loads about kPacksPerLane 16-byte vectors.
Config config_for(int64_t R, int64_t K, int64_t elem_size, int sms) {
  const int64_t per_lane = kPacksPerLane * (16 / elem_size);
  int tpr = 4;
  while (tpr < kWarp && int64_t(tpr) * per_lane < K) tpr *= 2;
  const int64_t max_blocks = int64_t(sms) * 32;  // the grid-stride loops cover the rest
  if (int64_t(tpr) * per_lane >= K) {
    const int rows_per_block = kBlock / tpr;
    return {tpr, kBlock, std::min((R + rows_per_block - 1) / rows_per_block, max_blocks)};
  }
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

// forward and forward_with_grad (grad defined; scale: the gradient's factor, none for 1).
void run_forward(const at::Tensor& x3, const at::Tensor& target, double log_alpha, double log_beta,
                 int64_t drainage_idx, int64_t ignore_index, const at::Tensor& loss, const at::Tensor& stats,
                 const at::Tensor& grad, const std::optional<at::Tensor>& scale) {
  const RowLayout rows = layout_of(x3);
  if (rows.R == 0) return;
  ForwardArgs args{x3.data_ptr(), target_view(target), loss.data_ptr(), stats.data_ptr(),
                   grad.defined() ? grad.data_ptr() : nullptr,
                   scale.has_value() ? scale->const_data_ptr() : nullptr,
                   rows, grad.defined() ? layout_of(grad) : rows, drainage_idx, ignore_index,
                   log_alpha, log_beta};
  const Config config = config_for(rows.R, rows.K, x3.element_size(), sm_count(x3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_forward_cuda", [&] {
    launch<ForwardKernel, scalar_t>(config, args);
  });
}

void check_device(const at::Tensor& x3) {
  TORCH_CHECK(x3.is_cuda(), "drainage_fast: the CUDA kernels need CUDA tensors, got ", x3.device());
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x3, const at::Tensor& target,
                                                double log_alpha, double log_beta, int64_t drainage_idx,
                                                int64_t ignore_index) {
  check_device(x3);
  check_rows(x3, target);
  check_drainage_idx(drainage_idx, x3.size(2));
  const c10::cuda::CUDAGuard guard(x3.device());
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts), stats = at::empty({kRowTerms, R}, opts);
  run_forward(x3, target, log_alpha, log_beta, drainage_idx, ignore_index, loss, stats, at::Tensor(), std::nullopt);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_with_grad_cuda(
    const at::Tensor& x3, const at::Tensor& target, const std::optional<at::Tensor>& scale,
    double log_alpha, double log_beta, int64_t drainage_idx, int64_t ignore_index) {
  check_device(x3);
  check_rows(x3, target);
  check_drainage_idx(drainage_idx, x3.size(2));
  check_scale(x3, scale);
  const c10::cuda::CUDAGuard guard(x3.device());
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts), stats = at::empty({kRowTerms, R}, opts);
  at::Tensor grad = at::empty_like(x3);  // keeps a dense input's layout (e.g. channels_last)
  run_forward(x3, target, log_alpha, log_beta, drainage_idx, ignore_index, loss, stats, grad, scale);
  return {loss, stats, grad};
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

// grad *= scale in place. grad comes from empty_like: dense, its numel elements fill one span.
void scale_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  check_device(grad);
  TORCH_CHECK(scale.numel() == 1 && scale.device() == grad.device(),
              "drainage_fast: scale must be a one-element tensor on ", grad.device());
  TORCH_CHECK(grad.is_non_overlapping_and_dense(), "drainage_fast: scale_ needs a dense gradient");
  const int64_t numel = grad.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = kBlock;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, int64_t(sm_count(grad)) * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "drainage_scale_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor s = scale.scalar_type() == c10::CppTypeToScalarType<T>::value
                             ? scale
                             : scale.to(c10::CppTypeToScalarType<T>::value);
    scale_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), s.const_data_ptr<T>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace drainage::cuda

TORCH_LIBRARY_IMPL(drainage_fast, CUDA, m) {
  m.impl("forward", &drainage::cuda::forward_cuda);
  m.impl("backward", &drainage::cuda::backward_cuda);
  m.impl("forward_with_grad", &drainage::cuda::forward_with_grad_cuda);
  m.impl("scale_", &drainage::cuda::scale_cuda);
}
