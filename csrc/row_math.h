// Per-row math of the abstention family (drainage_fast/_members.py), shared by the CPU and the CUDA
// kernels; the formulas of the reference backend (drainage_fast/backends/reference.py, the spec,
// with their derivations) and of the Triton kernels (backends/triton_kernels.py, _row_terms), with
// the transcendental calls that share an argument computed once (Tail below): the same values up to
// rounding, not the same bits.
//
// One pass over a row gives z_t, z_d, the max m of J = all outputs but {t, d} and
// s = sum over J of exp(z_j - m), so lse_J = m + log(s). A member is a function of (z_t, z_d, lse_J)
// that gives the loss and four row terms, from which the gradient is elementwise:
//
//     dl/dz_t = g_t        dl/dz_d = g_d        dl/dz_j = exp(z_j - shift) * c   (j in J, shift = m)
//
// Precision at any logit scale: every member is written in three differences of the inputs,
// z_t - z_d, m - z_t and m - z_d (each rounded once, relative to itself), and log s (at most log K).
// No constant is added to a number of the logits' magnitude, and no two such numbers are
// subtracted: at |z| ~ 1e4 that would put an fp32 error of ~1e-3 into every exponent. Drainage,
// with L = logaddexp(z_d, lse_J):
//
//     a = log(alpha) + L - z_t        b = log(beta) + lse_J - z_d        l = logsumexp(0, a, b)
//     g_t = -pi_a        g_d = pi_a exp(z_d - L) - pi_b        (pi_a, pi_b) = exp((a, b) - l)
//     c = pi_a exp(m - L) + pi_b / s
//
// Each member is written once, on a value type V with its math in M (ScalarMath below: one row in
// float or double, on the host or in CUDA device code; the CPU kernel's LaneMath: 16 rows in the
// lanes of a vector, cpu/drainage_cpu.cpp). Branches are selects, so both give the same values.
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

// The members: drainage_fast/_members.py Member (h1, h2 are each member's runtime hyper-parameters).
enum Member : int {
  kDrainage = 0,  // h1, h2 = log alpha, log beta
  kGamblers = 1,  // h1, h2 = log reward, log(1 - 1 / reward)
  kDac = 2,  // h1 = alpha
  kCeAll = 3,  // cross-entropy over all K outputs
  kCeClasses = 4,  // cross-entropy over the C classes
};
constexpr int kMembers = 5;

// The C names resolve to the same accurate functions on the host and in CUDA device code.
DRAINAGE_HD float exp_acc(float x) { return ::expf(x); }
DRAINAGE_HD double exp_acc(double x) { return ::exp(x); }
DRAINAGE_HD float log_acc(float x) { return ::logf(x); }
DRAINAGE_HD double log_acc(double x) { return ::log(x); }
DRAINAGE_HD float log1p_acc(float x) { return ::log1pf(x); }
DRAINAGE_HD double log1p_acc(double x) { return ::log1p(x); }
DRAINAGE_HD float expm1_acc(float x) { return ::expm1f(x); }
DRAINAGE_HD double expm1_acc(double x) { return ::expm1(x); }

template <typename T>
DRAINAGE_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
DRAINAGE_HD T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// The math of one row in T (float or double).
template <typename T>
struct ScalarMath {
  using V = T;
  static DRAINAGE_HD V splat(T x) { return x; }
  static DRAINAGE_HD V exp(V x) { return exp_acc(x); }
  static DRAINAGE_HD V log(V x) { return log_acc(x); }
  static DRAINAGE_HD V log1p(V x) { return log1p_acc(x); }
  static DRAINAGE_HD V expm1(V x) { return expm1_acc(x); }
  template <typename Mask>
  static DRAINAGE_HD V select(Mask c, V a, V b) {
    return c ? a : b;
  }
};

// x - y, and 0 where x == y (also for two equal infinities, where x - y is nan).
template <class M, class V>
DRAINAGE_HD V sub(V x, V y) {
  return M::select(x == y, M::splat(0), x - y);
}

// log(exp(x) + exp(y)). log1p keeps full relative precision when exp(lo - hi) is tiny: a confident
// row's loss is ~exp(a) + exp(b), far below the fp32 epsilon, and log(1 + x) would round it to 0.
// NaN survives (max / min would drop it); x = y = +-inf gives x + log 2 = x, as torch.logaddexp
// (both -inf: J empty), not inf - inf = nan.
template <class M, class V>
DRAINAGE_HD V logaddexp(V x, V y) {
  const auto x_gt = x > y;
  const V hi = M::select(x_gt, x, y), lo = M::select(x_gt, y, x);
  return M::select((x != x) | (y != y), x + y, hi + M::log1p(M::exp(sub<M>(lo, hi))));
}

// max(x, y), NaN where either is (as torch.maximum).
template <class M, class V>
DRAINAGE_HD V max_nan(V x, V y) {
  return M::select((x != x) | (y != y), x + y, M::select(x > y, x, y));
}

// -|x| (NaN stays).
template <class M, class V>
DRAINAGE_HD V neg_abs(V x) {
  return M::select(x > M::splat(0), -x, x);
}

// log(1 + exp(x)): exact for large x, full relative precision for very negative x.
template <class M, class V>
DRAINAGE_HD V softplus(V x) {
  return max_nan<M>(x, M::splat(0)) + M::log1p(M::exp(neg_abs<M>(x)));
}

template <class M, class V>
DRAINAGE_HD V sigmoid(V x) {
  const V e = M::exp(neg_abs<M>(x));
  return M::select(x >= M::splat(0), M::splat(1) / (M::splat(1) + e), e / (M::splat(1) + e));
}

// (l, log pi_a, log pi_b) of l = logsumexp(0, a, b), (pi_a, pi_b) = exp((a, b) - l).
template <class V>
struct Softplus2 {
  V l, log_pa, log_pb;
};

// l = mx + log1p(the two smaller of exp(0 - mx), exp(a - mx), exp(b - mx)): exact for the largest
// term, and a confident row (mx = 0) keeps the full relative precision of its tiny loss.
// a = b = +inf (e.g. Drainage's z_t = z_d = -inf): the split between them is undefined, nan as in
// the reference.
template <class M, class V>
DRAINAGE_HD Softplus2<V> softplus2(V a, V b) {
  const V mx = max_nan<M>(max_nan<M>(a, b), M::splat(0));
  const V da = sub<M>(a, mx), db = sub<M>(b, mx);
  const V ea = M::exp(da), eb = M::exp(db), e0 = M::exp(-mx);
  const V log_z = M::log1p(M::select(a == mx, e0 + eb, M::select(b == mx, e0 + ea, ea + eb)));
  const V inf = M::splat(-neg_inf<float>()), nan = M::splat(quiet_nan<float>());
  const auto undefined = (a == inf) & (b == inf);
  return {mx + log_z, M::select(undefined, nan, da - log_z), M::select(undefined, nan, db - log_z)};
}

template <typename T>
struct RowTerms {
  T loss, shift, c, g_t, g_d;
};

// exp(-|x|) and log1p of it: the shared part of softplus(x), softplus(-x), sigmoid(x), sigmoid(-x),
// and of a logaddexp whose two arguments differ by x. One exponential and one log1p serve them all
// (these transcendental calls are most of a short row's cost on the CPU).
template <class V>
struct Tail {
  V e, lp;
};

template <class M, class V>
DRAINAGE_HD Tail<V> tail_of(V x) {
  const V e = M::exp(neg_abs<M>(x));
  return {e, M::log1p(e)};
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), as softplus above.
template <class M, class V>
DRAINAGE_HD V softplus_of(V x, const Tail<V>& t) {
  return max_nan<M>(x, M::splat(0)) + t.lp;
}

// sigmoid(x), as sigmoid above.
template <class M, class V>
DRAINAGE_HD V sigmoid_of(V x, const Tail<V>& t) {
  const V one = M::splat(1);
  return M::select(x >= M::splat(0), one / (one + t.e), t.e / (one + t.e));
}

// What a member reads of a row: the differences d_td = z_t - z_d, d_md = m - z_d, J_t = lse_J - z_t,
// J_d = lse_J - z_d (-inf when J is empty or all -inf), log_s, and tail_J, the tail of J_d. The
// three log-sum-exps of the mass off t, L = logaddexp(z_d, lse_J), taken against z_t, z_d and m
// (L_t, L_d, m_L below), are logaddexps whose arguments differ by J_d: they share tail_J.
template <class V>
struct RowInputs {
  V d_td, d_md, J_t, J_d, log_s;
  Tail<V> tail_J;
};

// L - z_t = logaddexp(-d_td, J_t).
template <class M, class V>
DRAINAGE_HD V L_t(const RowInputs<V>& r) {
  return max_nan<M>(-r.d_td, r.J_t) + r.tail_J.lp;
}

// L - z_d = logaddexp(0, J_d).
template <class M, class V>
DRAINAGE_HD V L_d(const RowInputs<V>& r) {
  return max_nan<M>(M::splat(0), r.J_d) + r.tail_J.lp;
}

// m - L = -logaddexp(-d_md, log_s).
template <class M, class V>
DRAINAGE_HD V m_L(const RowInputs<V>& r) {
  return -(max_nan<M>(-r.d_md, r.log_s) + r.tail_J.lp);
}

// Each member: (loss, c, g_t, g_d) (the shift is m, set by row_terms), reference.py's row_terms.
template <class M, class V>
DRAINAGE_HD RowTerms<V> drainage_terms(const RowInputs<V>& r, V log_alpha, V log_beta) {
  const Softplus2<V> p = softplus2<M>(log_alpha + L_t<M>(r), log_beta + r.J_d);
  const V pa = M::exp(p.log_pa), pb = M::exp(p.log_pb);
  const V g_d = M::exp(p.log_pa - L_d<M>(r)) - pb;
  const V c = M::exp(logaddexp<M>(p.log_pa + m_L<M>(r), p.log_pb - r.log_s));
  return {p.l, V{}, c, -pa, g_d};
}

// l = -log(p_t + p_d / o) = log1p((p_d (1 - 1/o) + p_J) / (p_t + p_d / o)): softplus2 of
// a = log(1 - 1/o) + z_d - A and b = lse_J - A, A = logaddexp(z_t, z_d - log o), each formed against
// the larger term of A. sigma_u = e^(z_t - A), sigma_v = e^(z_d - log o - A) add to 1, and
// dl/dz_d = pi_a sigma_u - pi_b sigma_v: no cancellation of two terms near pi_a when sigma_v ~ 1.
template <class M, class V>
DRAINAGE_HD RowTerms<V> gamblers_terms(const RowInputs<V>& r, V log_reward, V log_keep) {
  const V x = r.d_td + log_reward;  // z_t - (z_d - log o)
  const auto t_leads = x >= M::splat(0);
  const Tail<V> tail = tail_of<M>(x);
  const V A_t = softplus_of<M>(-x, tail);  // A - z_t
  const V A_v = softplus_of<M>(x, tail);  // A - (z_d - log o)
  const V z_d_A = M::select(t_leads, -r.d_td - A_t, log_reward - A_v);
  const V lse_J_A = M::select(t_leads, r.J_t - A_t, r.J_d + log_reward - A_v);
  const Softplus2<V> p = softplus2<M>(log_keep + z_d_A, lse_J_A);
  const V sigma_u = sigmoid_of<M>(x, tail), sigma_v = sigmoid_of<M>(-x, tail);
  const V kept_mass = -M::expm1(-p.l);  // pi_a + pi_b = 1 - exp(-l), precise for tiny losses
  const V g_d = M::exp(p.log_pa) * sigma_u - M::exp(p.log_pb) * sigma_v;
  return {p.l, V{}, M::exp(p.log_pb - r.log_s), -kept_mass * sigma_u, g_d};
}

// l = q CE_C + alpha sp, B = logaddexp(z_t, lse_J) (the C classes), CE_C = B - z_t =
// softplus(lse_J - z_t), sp = -log(1 - p_d) = softplus(z_d - B), q = 1 - p_d; with
// r = alpha - q CE_C: dl/dz_d = p_d r, dl/dz_t = -p_d r e^(z_t - B) - q e^(lse_J - B),
// dl/dlse_J = e^(lse_J - B) (q - p_d r); e^(z_t - B) = sigmoid(z_t - lse_J).
template <class M, class V>
DRAINAGE_HD RowTerms<V> dac_terms(const RowInputs<V>& r, V alpha) {
  const Tail<V> tail_t = tail_of<M>(r.J_t);
  const V ce = softplus_of<M>(r.J_t, tail_t);
  const V z_d_B = M::select(r.J_t <= M::splat(0), -r.d_td - ce, -r.J_d - softplus_of<M>(-r.J_t, tail_t));
  const Tail<V> tail_d = tail_of<M>(z_d_B);
  const V sp = softplus_of<M>(z_d_B, tail_d);
  const V p_d = sigmoid_of<M>(z_d_B, tail_d), q = sigmoid_of<M>(-z_d_B, tail_d);
  const V rest = alpha - q * ce;
  const V share_J = sigmoid_of<M>(r.J_t, tail_t);  // e^(lse_J - B)
  const V g_t = -p_d * rest * sigmoid_of<M>(-r.J_t, tail_t) - q * share_J;
  const V c = M::exp(-r.log_s) * share_J * (q - p_d * rest);
  return {q * ce + alpha * sp, V{}, c, g_t, p_d * rest};
}

// l = softplus(D), D = L - z_t; sigma = 1 - p_t.
template <class M, class V>
DRAINAGE_HD RowTerms<V> ce_all_terms(const RowInputs<V>& r) {
  const V D = L_t<M>(r);
  const Tail<V> tail = tail_of<M>(D);
  const V sigma = sigmoid_of<M>(D, tail);
  const V g_d = sigma * M::exp(-L_d<M>(r));  // sigma e^(z_d - L)
  return {softplus_of<M>(D, tail), V{}, sigma * M::exp(m_L<M>(r)), -sigma, g_d};
}

// CE_C = softplus(lse_J - z_t); z_d takes no part.
template <class M, class V>
DRAINAGE_HD RowTerms<V> ce_classes_terms(const RowInputs<V>& r) {
  const Tail<V> tail = tail_of<M>(r.J_t);
  const V sigma = sigmoid_of<M>(r.J_t, tail);
  return {softplus_of<M>(r.J_t, tail), V{}, M::exp(-r.log_s) * sigma, -sigma, M::splat(0)};  // c = e^(m - B)
}

// The loss and the gradient's row terms of a member from z_t, z_d and J's max m and sum s (s = 0:
// J is empty, K = 2, or all of it is -inf).
template <class M, class V>
DRAINAGE_HD RowTerms<V> row_terms(int member, V z_t, V z_d, V m, V s, V h1, V h2) {
  const V zero = M::splat(0), ninf = M::splat(neg_inf<float>());
  const auto J_empty = s == zero;
  const V shift = M::select(m == ninf, zero, m);
  const V log_s = M::log(s);  // -inf when J is empty
  // Plain differences, so that an infinity meets an infinity as in the oracle (nan), but for two
  // -inf (no mass at t nor d: the row's loss is inf, as the oracle's).
  const V d_td = M::select((z_t == ninf) & (z_d == ninf), zero, z_t - z_d);
  const V d_md = shift - z_d;
  const V J_d = M::select(J_empty, ninf, d_md + log_s);
  // A NaN J_d comes from d_md = inf - inf (z_d = m = +inf) or a NaN logit: the logaddexps that share
  // its tail are then nan or infinite through their own arguments, as the plain logaddexps would be.
  Tail<V> tail_J = tail_of<M>(J_d);
  tail_J.lp = M::select(J_d != J_d, zero, tail_J.lp);
  const RowInputs<V> r = {d_td, d_md, M::select(J_empty, ninf, (shift - z_t) + log_s), J_d, log_s, tail_J};
  RowTerms<V> t;
  switch (member) {
    case kGamblers: t = gamblers_terms<M>(r, h1, h2); break;
    case kDac: t = dac_terms<M>(r, h1); break;
    case kCeAll: t = ce_all_terms<M>(r); break;
    case kCeClasses: t = ce_classes_terms<M>(r); break;
    default: t = drainage_terms<M>(r, h1, h2); break;
  }
  t.shift = shift;
  t.c = M::select(J_empty, zero, t.c);
  return t;
}

// The terms of the weighted loss w_r l_r.
template <class V>
DRAINAGE_HD RowTerms<V> weighted(RowTerms<V> t, V w) {
  return {t.loss * w, t.shift, t.c * w, t.g_t * w, t.g_d * w};
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
