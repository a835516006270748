// Per-row math of the drainage loss, shared by the CPU and the CUDA kernels; the same formulas as
// the Triton kernels (drainage_fast/backends/triton_kernels.py, whose docstring derives them).
//
// One pass over a row gives z_t, z_d, the max m of J = all outputs but {t, d} and
// s = sum over J of exp(z_j - m). With lse_J = m + log(s) and L = logaddexp(z_d, lse_J):
//
//     a = log(alpha) + L - z_t        b = log(beta) + lse_J - z_d        l = logsumexp(0, a, b)
//     dl/dz_t = -pi_a        dl/dz_d = pi_a exp(z_d - L) - pi_b        (pi_a, pi_b) = exp((a, b) - l)
//     dl/dz_j = exp(z_j - shift) * c,   c = pi_a exp(m - L) + pi_b / s,   shift = m   (j in J)
//
// Every exponent is a difference of nearby values, so the gradient keeps its precision at any
// logit scale. x - x is taken as 0 where both are the same infinity, which gives the reference's
// results for infinite logits.
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

// x - y, and 0 where x == y (also for two equal infinities, where x - y is nan).
template <typename T>
DRAINAGE_HD T sub(T x, T y) {
  return x == y ? T(0) : x - y;
}

template <typename T>
DRAINAGE_HD T max_nan(T x, T y) {
  if (x != x || y != y) return x + y;  // NaN propagates
  return x > y ? x : y;
}

template <typename T>
struct RowTerms {
  T loss, shift, c, g_t, g_d;
};

// The loss and the gradient's row terms from z_t, z_d and J's max m and sum s (s = 0: J is empty,
// K = 2, or all of it is -inf).
template <typename T>
DRAINAGE_HD RowTerms<T> row_terms(T z_t, T z_d, T m, T s, T log_alpha, T log_beta) {
  const bool J_empty = s == T(0);
  const T shift = m == neg_inf<T>() ? T(0) : m;
  const T log_s = J_empty ? T(0) : log_acc(s);
  const T lse_J = J_empty ? neg_inf<T>() : shift + log_s;
  const T L = logaddexp(z_d, lse_J);
  const T a = log_alpha + L - z_t;
  const T b = log_beta + lse_J - z_d;
  // l = mx + log1p(the two smaller of exp(0 - mx), exp(a - mx), exp(b - mx)): exact for the largest
  // term, and a confident row (mx = 0) keeps the full relative precision of its tiny loss.
  const T mx = max_nan(max_nan(a, b), T(0));
  const T da = sub(a, mx), db = sub(b, mx);
  const T ea = exp_acc(da), eb = exp_acc(db), e0 = exp_acc(-mx);
  const T log_z = log1p_acc(a == mx ? e0 + eb : (b == mx ? e0 + ea : ea + eb));
  // a = b = +inf (z_t = z_d = -inf): the split between them is undefined, nan as in the reference.
  const bool undefined = a == -neg_inf<T>() && b == -neg_inf<T>();
  const T log_pa = undefined ? quiet_nan<T>() : da - log_z;
  const T log_pb = undefined ? quiet_nan<T>() : db - log_z;
  const T c = J_empty ? T(0) : exp_acc(logaddexp(log_pa + sub(m, L), log_pb - log_s));
  return {mx + log_z, shift, c, -exp_acc(log_pa), exp_acc(log_pa + sub(z_d, L)) - exp_acc(log_pb)};
}

// The terms a row stores: an ignored row has loss 0 (its gradient is zeroed by a select, so inf or
// nan logits there give exactly 0); a target out of [0, K) or equal to d poisons the row with NaN.
template <typename T>
DRAINAGE_HD RowTerms<T> skipped_row(bool bad) {
  const T v = bad ? quiet_nan<T>() : T(0);
  return {v, T(0), v, v, v};
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
