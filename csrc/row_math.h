// Per-row math of the drainage loss, shared by the CPU and the CUDA kernels (DESIGN.md §1).
//
// A row needs three numbers from one pass over its K logits: z_t, z_d and
// lse_J = logsumexp(z_j, j in J), J = all outputs but the target t and the drainage output d. Then
//
//     a = log(alpha) + logaddexp(z_d, lse_J) - z_t        b = log(beta) + lse_J - z_d
//     l = logaddexp(0, logaddexp(a, b))
//
// and the gradient is elementwise given three row terms (every exponent is <= log 2):
//
//     w = logaddexp(log(alpha) - z_t - l, log(beta) - z_d - l)
//     g_j = exp(z_j + w) for j in J,   g_t = -exp(a - l),   g_d = exp(log(alpha) + z_d - z_t - l) - exp(b - l)
//
// T is the compute type: float for float / half / bfloat16 logits, double for double.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define DRAINAGE_HD __host__ __device__ __forceinline__
#else
#define DRAINAGE_HD inline
#endif

namespace drainage {

// The C names resolve to the same accurate functions on the host and in CUDA device code.
DRAINAGE_HD float exp_acc(float x) { return ::expf(x); }
DRAINAGE_HD double exp_acc(double x) { return ::exp(x); }
DRAINAGE_HD float log_acc(float x) { return ::logf(x); }
DRAINAGE_HD double log_acc(double x) { return ::log(x); }
DRAINAGE_HD float log1p_acc(float x) { return ::log1pf(x); }
DRAINAGE_HD double log1p_acc(double x) { return ::log1p(x); }

template <typename T>
DRAINAGE_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
DRAINAGE_HD T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// log(exp(x) + exp(y)). log1p keeps full relative precision when exp(lo - hi) is tiny: a confident
// row's loss is ~exp(a) + exp(b), far below the fp32 epsilon, and log(1 + x) would round it to 0.
template <typename T>
DRAINAGE_HD T logaddexp(T x, T y) {
  if (x != x || y != y) return x + y;  // NaN must survive; max / min would drop it
  const T hi = x > y ? x : y;
  const T lo = x > y ? y : x;
  if (hi == neg_inf<T>()) return hi;  // both -inf (J empty): -inf, not -inf - -inf = nan
  return hi + log1p_acc(exp_acc(lo - hi));
}

// lse_J from a max m over J and s = sum_J exp(z_j - m) (s = 0: J empty or all of it -inf).
template <typename T>
DRAINAGE_HD T lse_from(T m, T s) {
  return s == T(0) ? neg_inf<T>() : m + log_acc(s);
}

template <typename T>
struct RowTerms {
  T loss, w, g_t, g_d;
};

template <typename T>
DRAINAGE_HD RowTerms<T> row_terms(T z_t, T z_d, T lse_J, T log_alpha, T log_beta) {
  const T a = log_alpha + logaddexp(z_d, lse_J) - z_t;
  const T b = log_beta + lse_J - z_d;
  const T loss = logaddexp(T(0), logaddexp(a, b));
  const T u = log_alpha - z_t - loss;
  const T w = logaddexp(u, log_beta - z_d - loss);
  return {loss, w, -exp_acc(a - loss), exp_acc(z_d + u) - exp_acc(b - loss)};
}

// The terms a row stores: an ignored row has loss 0 (its gradient is zeroed by a select, so inf or
// nan logits there give exactly 0); a target out of [0, K) or equal to d poisons the row with NaN.
template <typename T>
DRAINAGE_HD RowTerms<T> skipped_row(bool bad) {
  const T v = bad ? quiet_nan<T>() : T(0);
  return {v, v, v, v};
}

// Whether a target is usable: ignore_index rows are skipped, anything else must be a class != d.
struct TargetCheck {
  bool kept, bad;
};

DRAINAGE_HD TargetCheck check_target(int64_t t, int64_t K, int64_t d, int64_t ignore_index) {
  const bool kept = t != ignore_index;
  return {kept, kept && (t < 0 || t >= K || t == d)};
}

}  // namespace drainage
