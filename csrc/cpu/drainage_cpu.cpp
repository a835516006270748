// CPU kernels of the drainage loss: rows in parallel (at::parallel_for), the loops over a row
// vectorised (`omp simd` + fast_exp.h; the flags are in drainage_fast/_ext.py).
//
// A row is first made a contiguous run of compute-type values T: float32 rows of unit stride are
// used in place, anything else (half types, strided rows) is converted into a per-task buffer.
// The forward takes two passes over it: a max over J (the read from memory) and a sum of
// exponentials over J (from L1). J is the index ranges [0, lo), (lo, hi), (hi, K) with
// lo, hi = min, max(t, d), so no loop tests an element's index.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../drainage_common.h"
#include "fast_exp.h"

namespace drainage::cpu {
namespace {

// Rows per parallel task: ~16k elements, so short rows are not split into tiny tasks.
int64_t grain_rows(int64_t K) { return std::max<int64_t>(1, 16384 / K); }

// The reductions are `omp simd` loops: the pragma lets the compiler keep one partial result per
// vector lane (it may not reorder a float sum on its own). The order is fixed at compile time, so
// the results are deterministic.
template <typename T>
T max_of(const T* z, int64_t begin, int64_t end, T m) {
#pragma omp simd reduction(max : m)
  for (int64_t k = begin; k < end; ++k) m = z[k] > m ? z[k] : m;
  return m;  // may skip a NaN: the sum of exponentials carries it into lse_J
}

// sum over [begin, end) of exp(z_k - shift); with `e`, each term is also stored in e[k].
template <typename T>
T sum_exp(const T* z, int64_t begin, int64_t end, T shift, T* e) {
  T s = 0;
  if (e == nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t k = begin; k < end; ++k) s += fast_exp(z[k] - shift);
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t k = begin; k < end; ++k) {
      e[k] = fast_exp(z[k] - shift);
      s += e[k];
    }
  }
  return s;
}

// sum_exp over J for a row whose max is +inf, where exp(inf - inf) would be nan: the terms equal to
// the shift count 1 (the reference's loss is then inf, its gradient nan). Rare, so a scalar loop.
template <typename T>
T sum_exp_slow(const T* z, int64_t K, int64_t t, int64_t d, T shift, T* e) {
  T s = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (k == t || k == d) continue;
    const T v = z[k] == shift ? T(1) : fast_exp(z[k] - shift);
    if (e != nullptr) e[k] = v;
    s += v;
  }
  return s;
}

// J's max m and s = sum over J of exp(z_j - shift), J = [0, K) \ {t, d}, shift = m (0 when every
// z_j is -inf or J is empty). With `e`, e[j] = exp(z_j - shift) for j in J: the gradient's factors.
template <typename T>
T max_sum_J(const T* z, int64_t K, int64_t t, int64_t d, T* e, T& m) {
  const int64_t lo = std::min(t, d), hi = std::max(t, d);
  m = max_of(z, hi + 1, K, max_of(z, lo + 1, hi, max_of(z, int64_t{0}, lo, neg_inf<T>())));
  if (m == -neg_inf<T>()) return sum_exp_slow(z, K, t, d, m, e);
  const T shift = m == neg_inf<T>() ? T(0) : m;  // all -inf: exp(-inf - 0) = 0, not nan
  return sum_exp(z, 0, lo, shift, e) + sum_exp(z, lo + 1, hi, shift, e) + sum_exp(z, hi + 1, K, shift, e);
}

// g = scale * dl/dz of a row whose g[j] already holds exp(z_j - shift) for j in J: the gradient
// in the forward costs no second exponential.
template <typename T>
void grad_from_exp(int64_t K, int64_t t, int64_t d, const RowTerms<T>& terms, T scale, T* g) {
  const T factor = terms.c * scale;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) g[k] *= factor;
  g[t] = terms.g_t * scale;
  g[d] = terms.g_d * scale;
}

// The same values from the logits and the stored row terms (the recompute backward): the same
// expression as the forward's, exp(z_j - shift) * (c * scale), so both give the same bits.
template <typename T>
void grad_from_logits(const T* z, int64_t K, int64_t t, int64_t d, const RowTerms<T>& terms, T scale, T* g) {
  const T factor = terms.c * scale;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) g[k] = fast_exp(z[k] - terms.shift) * factor;
  g[t] = terms.g_t * scale;
  g[d] = terms.g_d * scale;
}

// One row of the logits as contiguous compute-type values: in place when it already is one.
template <typename scalar_t, typename T>
const T* load_row(const scalar_t* x, int64_t K, int64_t stride_k, T* buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (stride_k == 1) return x;
  }
  if (stride_k == 1) {
    for (int64_t k = 0; k < K; ++k) buffer[k] = static_cast<T>(x[k]);
  } else {
    for (int64_t k = 0; k < K; ++k) buffer[k] = static_cast<T>(x[k * stride_k]);
  }
  return buffer;
}

// Where a row's gradient is computed: in the output when that is a contiguous row of T, else in
// the buffer, which store_row then converts and scatters.
template <typename scalar_t, typename T>
T* grad_slot(scalar_t* g, int64_t stride_k, T* buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (stride_k == 1) return g;
  }
  return buffer;
}

template <typename scalar_t, typename T>
void store_row(const T* values, scalar_t* g, int64_t K, int64_t stride_k) {
  if (static_cast<const void*>(values) == static_cast<const void*>(g)) return;
  for (int64_t k = 0; k < K; ++k) g[k * stride_k] = static_cast<scalar_t>(values[k]);
}

template <typename scalar_t>
void fill_row(scalar_t* g, int64_t K, int64_t stride_k, scalar_t value) {
  for (int64_t k = 0; k < K; ++k) g[k * stride_k] = value;
}

// forward, and forward_with_grad when `grad` is defined: then grad = grad_scale * d(sum loss)/dx.
template <typename scalar_t>
void forward_rows(const at::Tensor& x3, const at::Tensor& target, double log_alpha, double log_beta,
                  int64_t d, int64_t ignore_index, const at::Tensor& loss, const at::Tensor& stats,
                  const at::Tensor& grad, double grad_scale) {
  using T = at::opmath_type<scalar_t>;  // float for the half types, else the type itself
  const RowLayout rows = layout_of(x3);
  const TargetView targets = target_view(target);
  const scalar_t* x = x3.const_data_ptr<scalar_t>();
  T* loss_p = loss.mutable_data_ptr<T>();
  T* stats_p = stats.mutable_data_ptr<T>();
  const bool write_grad = grad.defined();
  scalar_t* g = write_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const RowLayout g_rows = write_grad ? layout_of(grad) : rows;
  const int64_t R = rows.R, K = rows.K;

  at::parallel_for(0, R, grain_rows(K), [&](int64_t begin, int64_t end) {
    std::vector<T> z_buffer(K), g_buffer(write_grad ? K : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = targets[r];
      const TargetCheck check = check_target(t, K, d, ignore_index);
      RowTerms<T> terms = skipped_row<T>(check.bad);
      scalar_t* g_row = write_grad ? g + g_rows.start(r) : nullptr;
      T* e = write_grad ? grad_slot(g_row, g_rows.stride_k, g_buffer.data()) : nullptr;
      if (check.kept && !check.bad) {
        const T* z = load_row(x + rows.start(r), K, rows.stride_k, z_buffer.data());
        T m;
        const T s = max_sum_J(z, K, t, d, e, m);
        terms = row_terms(z[t], z[d], m, s, T(log_alpha), T(log_beta));
      }
      loss_p[r] = terms.loss;
      stats_p[r] = terms.shift;
      stats_p[R + r] = terms.c;
      stats_p[2 * R + r] = terms.g_t;
      stats_p[3 * R + r] = terms.g_d;
      if (!write_grad) continue;
      if (!check.kept) {
        fill_row(g_row, K, g_rows.stride_k, scalar_t(0));  // a select: inf / nan logits give 0
      } else if (check.bad) {
        fill_row(g_row, K, g_rows.stride_k, static_cast<scalar_t>(quiet_nan<T>()));
      } else {
        grad_from_exp(K, t, d, terms, T(grad_scale), e);
        store_row(e, g_row, K, g_rows.stride_k);
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& x3, const at::Tensor& target, const at::Tensor& stats,
                   const at::Tensor& grad_rows, int64_t d, int64_t ignore_index, const at::Tensor& grad) {
  using T = at::opmath_type<scalar_t>;
  const RowLayout rows = layout_of(x3), g_rows = layout_of(grad);
  const TargetView targets = target_view(target);
  const scalar_t* x = x3.const_data_ptr<scalar_t>();
  const T* stats_p = stats.const_data_ptr<T>();
  const T* dy = grad_rows.const_data_ptr<T>();
  const int64_t dy_stride = grad_rows.stride(0);  // 0 for a broadcast upstream scalar
  scalar_t* g = grad.mutable_data_ptr<scalar_t>();
  const int64_t R = rows.R, K = rows.K;

  at::parallel_for(0, R, grain_rows(K), [&](int64_t begin, int64_t end) {
    std::vector<T> z_buffer(K), g_buffer(K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = targets[r];
      const TargetCheck check = check_target(t, K, d, ignore_index);
      scalar_t* g_row = g + g_rows.start(r);
      if (!check.kept) {
        fill_row(g_row, K, g_rows.stride_k, scalar_t(0));
      } else if (check.bad) {
        fill_row(g_row, K, g_rows.stride_k, static_cast<scalar_t>(quiet_nan<T>()));
      } else {
        const RowTerms<T> terms = {T(0), stats_p[r], stats_p[R + r], stats_p[2 * R + r], stats_p[3 * R + r]};
        const T* z = load_row(x + rows.start(r), K, rows.stride_k, z_buffer.data());
        T* out = grad_slot(g_row, g_rows.stride_k, g_buffer.data());
        grad_from_logits(z, K, t, d, terms, dy[r * dy_stride], out);
        store_row(out, g_row, K, g_rows.stride_k);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x3, const at::Tensor& target,
                                               double log_alpha, double log_beta, int64_t drainage_idx,
                                               int64_t ignore_index) {
  check_rows(x3, target);
  check_drainage_idx(drainage_idx, x3.size(2));
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts), stats = at::empty({kRowTerms, R}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_forward_cpu", [&] {
    forward_rows<scalar_t>(x3, target, log_alpha, log_beta, drainage_idx, ignore_index, loss, stats,
                           at::Tensor(), 1.0);
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_with_grad_cpu(
    const at::Tensor& x3, const at::Tensor& target, const std::optional<at::Tensor>& scale,
    double log_alpha, double log_beta, int64_t drainage_idx, int64_t ignore_index) {
  check_rows(x3, target);
  check_drainage_idx(drainage_idx, x3.size(2));
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts), stats = at::empty({kRowTerms, R}, opts);
  at::Tensor grad = at::empty_like(x3);  // keeps a dense input's layout (e.g. channels_last)
  check_scale(x3, scale);
  // The gradient's factor (1 / count for a mean), in the compute type: converting it to T is exact.
  const double factor = scale.has_value() ? scale->item<double>() : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_forward_with_grad_cpu", [&] {
    forward_rows<scalar_t>(x3, target, log_alpha, log_beta, drainage_idx, ignore_index, loss, stats, grad, factor);
  });
  return {loss, stats, grad};
}

at::Tensor backward_cpu(const at::Tensor& x3, const at::Tensor& target, const at::Tensor& stats,
                        const at::Tensor& grad_rows, int64_t drainage_idx, int64_t ignore_index) {
  check_rows(x3, target);
  check_drainage_idx(drainage_idx, x3.size(2));
  check_stats(x3, stats, grad_rows);
  at::Tensor grad = at::empty_like(x3);
  const at::Tensor dy = grad_rows.scalar_type() == stats.scalar_type() ? grad_rows : grad_rows.to(stats.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_backward_cpu", [&] {
    backward_rows<scalar_t>(x3, target, stats, dy, drainage_idx, ignore_index, grad);
  });
  return grad;
}

// On the CPU reading the scale costs nothing (there is no device to wait for).
void scale_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "drainage_fast: scale must have one element, got ", scale.numel());
  if (scale.item<double>() != 1.0) grad.mul_(scale.reshape({}));
}

}  // namespace
}  // namespace drainage::cpu

TORCH_LIBRARY_IMPL(drainage_fast, CPU, m) {
  m.impl("forward", &drainage::cpu::forward_cpu);
  m.impl("backward", &drainage::cpu::backward_cpu);
  m.impl("forward_with_grad", &drainage::cpu::forward_with_grad_cpu);
  m.impl("scale_", &drainage::cpu::scale_cpu);
}
