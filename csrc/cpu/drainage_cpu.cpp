// CPU kernels of the drainage loss: rows in parallel (at::parallel_for); inside a task, rows in
// groups whose per-row math (row_math.h: a dozen exp / log / log1p a row) runs across the group's
// rows in vector lanes, and whose loops over a row run on 16-float vectors (fast_exp.h).
//
// The loops read a float32 row of unit stride in place (anything else is first converted into a
// per-task buffer) in chunks of 16: whole chunks with plain loads, the last partial one with a
// masked load that fills -inf (exp(-inf - shift) = 0 exactly); indices are compared to leave t and
// d out of J (in a long row only in the runs of chunks that hold them). Only the rows that count
// (kept, with a valid target) are read. The forward takes two passes over a row (J's max, then the
// exponentials, kept in a 64-byte aligned buffer when the forward writes the gradient), four short
// rows at once or a long row in four accumulators, so that no loop waits on one chain; the row
// terms of a group of up to 16 rows follow, in one call of vector exp / log / log1p (SLEEF, within
// 1 ulp) per term for the whole group, then the group's gradient rows, stored on 64-byte
// boundaries. Measured (issue 11): the scalar row math was most of a row's time for K <= ~100.
//
// Every per-row value comes from the same lane-wise operations whatever group or task the row
// falls in (no lane reads another, and a row's chunks start at its first value), so the results
// do not depend on the thread count. float64 rows keep the scalar libm path of row_math.h.
//
// Per-pixel rows whose outputs are strided and whose neighbours are adjacent (NCHW logits) take
// the pixel layout instead (below, "Pixel layout"): 16 pixels in the lanes and a loop over the
// outputs, with the same bits per row as the row path.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#include <sleef.h>  // shipped with torch; its functions are exported by libtorch_cpu
#endif

#include "../drainage_common.h"
#include "fast_exp.h"

namespace drainage::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Accurate exp / log / log1p / expm1 on 16 lanes for the row math (within 1 ulp, as libm's): SLEEF's
// vector functions where the target has AVX, else libm lane by lane.

#if defined(__AVX512F__)
inline vfloat vexp_acc(vfloat x) { return (vfloat)Sleef_expf16_u10((__m512)x); }
inline vfloat vlog_acc(vfloat x) { return (vfloat)Sleef_logf16_u10((__m512)x); }
inline vfloat vlog1p_acc(vfloat x) { return (vfloat)Sleef_log1pf16_u10((__m512)x); }
inline vfloat vexpm1_acc(vfloat x) { return (vfloat)Sleef_expm1f16_u10((__m512)x); }
#elif defined(__AVX__)
using half_vfloat = float __attribute__((vector_size(32)));
template <typename F>
inline vfloat by_halves(vfloat x, F f) {
  half_vfloat lo, hi;
  __builtin_memcpy(&lo, &x, sizeof(lo));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(lo), sizeof(hi));
  lo = (half_vfloat)f((__m256)lo);
  hi = (half_vfloat)f((__m256)hi);
  vfloat out;
  __builtin_memcpy(&out, &lo, sizeof(lo));
  __builtin_memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
  return out;
}
inline vfloat vexp_acc(vfloat x) { return by_halves(x, [](__m256 v) { return Sleef_expf8_u10(v); }); }
inline vfloat vlog_acc(vfloat x) { return by_halves(x, [](__m256 v) { return Sleef_logf8_u10(v); }); }
inline vfloat vlog1p_acc(vfloat x) { return by_halves(x, [](__m256 v) { return Sleef_log1pf8_u10(v); }); }
inline vfloat vexpm1_acc(vfloat x) { return by_halves(x, [](__m256 v) { return Sleef_expm1f8_u10(v); }); }
#else
template <typename F>
inline vfloat lane_by_lane(vfloat x, F f) {
  for (int i = 0; i < kLanes; ++i) x[i] = f(x[i]);
  return x;
}
inline vfloat vexp_acc(vfloat x) { return lane_by_lane(x, [](float v) { return exp_acc(v); }); }
inline vfloat vlog_acc(vfloat x) { return lane_by_lane(x, [](float v) { return log_acc(v); }); }
inline vfloat vlog1p_acc(vfloat x) { return lane_by_lane(x, [](float v) { return log1p_acc(v); }); }
inline vfloat vexpm1_acc(vfloat x) { return lane_by_lane(x, [](float v) { return expm1_acc(v); }); }
#endif

// row_math.h's math on 16 lanes, one row a lane: its member functions then run on 16 rows at once.
struct LaneMath {
  using V = vfloat;
  static V splat(float x) { return vsplat(x); }
  static V exp(V x) { return vexp_acc(x); }
  static V log(V x) { return vlog_acc(x); }
  static V log1p(V x) { return vlog1p_acc(x); }
  static V expm1(V x) { return vexpm1_acc(x); }
  static V select(vint c, V a, V b) { return c ? a : b; }
};

// Inputs and outputs of the row math for one group of rows, one lane a row.
template <typename T>
struct RowLanes {
  alignas(64) T z_t[kLanes], z_d[kLanes], m[kLanes], s[kLanes], w[kLanes];
  alignas(64) T loss[kLanes], shift[kLanes], c[kLanes], g_t[kLanes], g_d[kLanes];

  // Harmless values (every term finite) for lanes without a row.
  void clear(int i) {
    z_t[i] = T(0), z_d[i] = T(0), m[i] = T(0), s[i] = T(1), w[i] = T(1);
  }
  RowTerms<T> terms(int i) const { return {loss[i], shift[i], c[i], g_t[i], g_d[i]}; }
};

// row_terms (row_math.h) of 16 rows at once; with weights, those of the weighted loss w l.
void row_terms_lanes(RowLanes<float>& q, const Hyper& hp) {
  RowTerms<vfloat> t = row_terms<LaneMath>(hp.member, vload(q.z_t), vload(q.z_d), vload(q.m), vload(q.s),
                                           vsplat(static_cast<float>(hp.h1)), vsplat(static_cast<float>(hp.h2)));
  if (hp.weight.ptr != nullptr) t = weighted(t, vload(q.w));
  vstore(q.loss, t.loss);
  vstore(q.shift, t.shift);
  vstore(q.c, t.c);
  vstore(q.g_t, t.g_t);
  vstore(q.g_d, t.g_d);
}

// float64: row_math.h's scalar math, row by row (libm; gradcheck and exactness, not speed).
void row_terms_lanes(RowLanes<double>& q, const Hyper& hp) {
  for (int i = 0; i < kLanes; ++i) {
    RowTerms<double> t = row_terms<ScalarMath<double>>(hp.member, q.z_t[i], q.z_d[i], q.m[i], q.s[i], hp.h1, hp.h2);
    if (hp.weight.ptr != nullptr) t = weighted(t, q.w[i]);
    q.loss[i] = t.loss, q.shift[i] = t.shift, q.c[i] = t.c, q.g_t[i] = t.g_t, q.g_d[i] = t.g_d;
  }
}

// ---------------------------------------------------------------------------------------------
// Loops over one row of K compute-type values: whole 16-value chunks, the last partial chunk by a
// masked load padded with -inf (exp(-inf - shift) = 0 exactly). J is selected by comparing the
// chunk's indices with t and d, so one loop covers the row.

int64_t padded(int64_t K) { return (K + kLanes - 1) / kLanes * kLanes; }

// The row as contiguous compute-type values: in place when it already is one, else converted.
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

const vint kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// The two halves of a vector (memcpy of a register: the compiler emits a lane extract).
template <typename Half, typename Whole>
inline void halves(const Whole& v, Half& lo, Half& hi) {
  static_assert(2 * sizeof(Half) == sizeof(Whole));
  __builtin_memcpy(&lo, &v, sizeof(Half));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
}

using vfloat8 = float __attribute__((vector_size(32)));
using vfloat4 = float __attribute__((vector_size(16)));

// Lanes summed in a fixed order: halves, then halves of halves...
inline float sum_lanes(vfloat v) {
  vfloat8 a0, a1;
  halves(v, a0, a1);
  const vfloat8 a = a0 + a1;
  vfloat4 b0, b1;
  halves(a, b0, b1);
  const vfloat4 b = b0 + b1;
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The largest lane (a max of non-NaN values).
inline float max_lanes(vfloat v) {
  vfloat8 a0, a1;
  halves(v, a0, a1);
  const vfloat8 a = a1 > a0 ? a1 : a0;
  vfloat4 b0, b1;
  halves(a, b0, b1);
  const vfloat4 b = b1 > b0 ? b1 : b0;
  const float c0 = b[1] > b[0] ? b[1] : b[0], c1 = b[3] > b[2] ? b[3] : b[2];
  return c1 > c0 ? c1 : c0;
}

// v[i] = p[i] for i < n, -inf past n (n < 16); never reads past p + n.
inline vfloat vload_tail(const float* p, int64_t n) {
#if defined(__AVX512F__)
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  return (vfloat)_mm512_mask_loadu_ps(_mm512_set1_ps(neg_inf<float>()), mask, p);
#elif defined(__AVX2__)
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lo_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
  const __m256i hi_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n) - 8), lanes);
  const __m256 ninf = _mm256_set1_ps(neg_inf<float>());
  const __m256 lo = _mm256_blendv_ps(ninf, _mm256_maskload_ps(p, lo_mask), _mm256_castsi256_ps(lo_mask));
  const __m256 hi = _mm256_blendv_ps(ninf, _mm256_maskload_ps(p + 8, hi_mask), _mm256_castsi256_ps(hi_mask));
  vfloat v;
  __builtin_memcpy(&v, &lo, sizeof(lo));
  __builtin_memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  vfloat v = vsplat(neg_inf<float>());
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

// p[i] = v[i] for i < n (n < 16); never writes past p + n.
inline void vstore_tail(float* p, vfloat v, int64_t n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
#else
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// Every lane of a chunk in J (it holds neither t nor d), or the lanes of a mask.
struct AllLanes {};
inline vfloat select(AllLanes, vfloat a, vfloat) { return a; }
inline vfloat select(vint in_J, vfloat a, vfloat b) { return in_J ? a : b; }

// a > b ? a : b, lane by lane (b where either is NaN): one instruction with AVX-512.
inline vfloat vmax(vfloat a, vfloat b) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_max_ps((__m512)a, (__m512)b);
#else
  return a > b ? a : b;
#endif
}

// For NB float rows z[i] with targets t[i]: J's max m[i] (skipping NaN: the sum of exponentials
// carries it into lse_J) and s[i] = the sum over J of exp(z_ik - shift_i), shift_i = m[i] (0 when
// m[i] = -inf; a row with m[i] = +inf needs sum_exp_slow); with kStore, e[i][k] = exp(z_ik - shift_i)
// for every k in [0, Kp). The chunks are v = z[k, k + 16) (-inf past K), and J's lanes are chosen
// by comparing indices with t and d in every chunk: a branch on "this chunk holds t" mispredicts
// about once a short row.
//
// Why NB rows at once: a short row alone is one chain of dependent steps (max, a horizontal max,
// exp, sum, a horizontal sum) that leaves the core waiting; NB independent chains in one loop
// overlap. Measured on the op with gradient at (512, 51) fp32, 1 thread: 52.2 us with the branch,
// 49.2 us with the compares, 45.8 us with 4 rows at once. Each row's values come from its own lane
// operations only, so they have the same bits for any NB, group or thread count.
template <int NB, bool kStore>
inline void max_and_sum_J(const float* const* z, int64_t K, const int64_t* t, int64_t d, float* m, float* s,
                          float* const* e) {
  const int64_t full = K / kLanes * kLanes, tail = K - full;
  const vint vd = vint{} + static_cast<int32_t>(d);
  vint vt[NB];
  vfloat acc[NB];
  for (int i = 0; i < NB; ++i) {
    vt[i] = vint{} + static_cast<int32_t>(t[i]);
    acc[i] = vsplat(neg_inf<float>());
  }
  // f(i, k, v, in_J) for every chunk of every row, rows innermost: the NB chains interleave.
  auto for_chunks = [&](auto f) {
    auto chunk = [&](int64_t k, auto load) {
      const vint idx = kIota + static_cast<int32_t>(k);
      const vint not_d = idx != vd;
      for (int i = 0; i < NB; ++i) f(i, k, load(z[i] + k), not_d & (idx != vt[i]));
    };
    for (int64_t k = 0; k < full; k += kLanes) chunk(k, [](const float* p) { return vload(p); });
    if (tail > 0) chunk(full, [&](const float* p) { return vload_tail(p, tail); });
  };
  for_chunks([&](int i, int64_t, vfloat v, vint in_J) { acc[i] = in_J ? vmax(v, acc[i]) : acc[i]; });
  vfloat shift[NB];
  for (int i = 0; i < NB; ++i) {
    m[i] = max_lanes(acc[i]);
    shift[i] = vsplat(m[i] == neg_inf<float>() ? 0.0f : m[i]);  // all -inf: exp(-inf - 0) = 0, not nan
    acc[i] = vsplat(0.0f);
  }
  for_chunks([&](int i, int64_t k, vfloat v, vint in_J) {
    const vfloat ev = fast_exp(v - shift[i]);
    if constexpr (kStore) vstore(e[i] + k, ev);
    acc[i] += in_J ? ev : vsplat(0.0f);
  });
  for (int i = 0; i < NB; ++i) s[i] = sum_lanes(acc[i]);
}

// max_and_sum_J of one long row (K > kBlockMaxK), in kSplit accumulators over consecutive chunks:
// one accumulator is a chain of dependent max / add a chunk long, which held the loop to its
// latency (measured at (512, 32001) fp32 on 2 threads, the forward alone: 5.6 ms with one
// accumulator, 4.4 ms with four). Only the runs of chunks that hold t or d compare indices. The
// order of the sums depends on K alone.
constexpr int kSplit = 4;

template <bool kStore>
inline void max_and_sum_long_row(const float* z, int64_t K, int64_t t, int64_t d, float& m, float& s, float* e) {
  constexpr int64_t kRun = kSplit * kLanes;
  const int64_t full = K / kLanes * kLanes, tail = K - full;
  const vint vt = vint{} + static_cast<int32_t>(t), vd = vint{} + static_cast<int32_t>(d);
  auto in_J = [&](int64_t k) {
    const vint idx = kIota + static_cast<int32_t>(k);
    return (idx != vt) & (idx != vd);
  };
  // f(u, k, v, in_J): the chunk at k goes to accumulator u.
  auto for_chunks = [&](auto f) {
    int64_t k = 0;
    for (; k + kRun <= full; k += kRun) {
      if (static_cast<uint64_t>(t - k) >= kRun && static_cast<uint64_t>(d - k) >= kRun) {
        for (int u = 0; u < kSplit; ++u) f(u, k + u * kLanes, vload(z + k + u * kLanes), AllLanes{});
      } else {
        for (int u = 0; u < kSplit; ++u) f(u, k + u * kLanes, vload(z + k + u * kLanes), in_J(k + u * kLanes));
      }
    }
    for (int u = 0; k < full; k += kLanes, ++u) f(u, k, vload(z + k), in_J(k));
    if (tail > 0) f(kSplit - 1, full, vload_tail(z + full, tail), in_J(full));
  };
  vfloat acc[kSplit];
  for (vfloat& a : acc) a = vsplat(neg_inf<float>());
  for_chunks([&](int u, int64_t, vfloat v, auto lanes) { acc[u] = select(lanes, vmax(v, acc[u]), acc[u]); });
  m = max_lanes(vmax(vmax(acc[0], acc[1]), vmax(acc[2], acc[3])));  // no lane of acc is NaN
  const vfloat shift = vsplat(m == neg_inf<float>() ? 0.0f : m);
  for (vfloat& a : acc) a = vsplat(0.0f);
  for_chunks([&](int u, int64_t k, vfloat v, auto lanes) {
    const vfloat ev = fast_exp(v - shift);
    if constexpr (kStore) vstore(e + k, ev);
    acc[u] += select(lanes, ev, vsplat(0.0f));
  });
  s = sum_lanes((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// Rows per call of max_and_sum_J, for rows up to kBlockMaxK long (longer rows are no chain of
// waits: one at a time).
constexpr int kBlock = 4;
constexpr int64_t kBlockMaxK = 256;

inline double max_J(const double* z, int64_t K, int64_t t, int64_t d) {
  double m = neg_inf<double>();
  for (int64_t k = 0; k < K; ++k) {
    if (k != t && k != d) m = z[k] > m ? z[k] : m;
  }
  return m;
}

// The double rows' s = sum over J of exp(z_j - shift); with `e`, e[k] = exp(z_k - shift) for every k.
template <bool kStore>
double sum_exp_J(const double* z, int64_t K, int64_t t, int64_t d, double shift, double* e) {
  double s = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double v = fast_exp(z[k] - shift);
    if constexpr (kStore) e[k] = v;
    if (k != t && k != d) s += v;
  }
  return s;
}

// The sum over J for a row whose max is +inf, where exp(inf - inf) would be nan: the terms equal to
// the shift count 1 (the reference's loss is then inf, its gradient nan). Rare: a scalar loop. The
// row's k-th value is z[k * z_stride]; with e, e[k * e_stride] = its term (k in J). The terms are
// 0, 1 or nan, so their sum is exact in any order.
template <typename Z, typename T>
T sum_exp_slow(const Z* z, int64_t z_stride, int64_t K, int64_t t, int64_t d, T shift, T* e, int64_t e_stride) {
  T s = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (k == t || k == d) continue;
    const T zk = static_cast<T>(z[k * z_stride]);
    const T v = zk == shift ? T(1) : fast_exp(zk - shift);
    if (e != nullptr) e[k * e_stride] = v;
    s += v;
  }
  return s;
}

// m and s of nb rows (1 or kBlock), as max_and_sum_J: float rows together, double rows one by one.
inline void max_and_sum_rows(int nb, const float* const* z, int64_t K, const int64_t* t, int64_t d, float* m,
                             float* s, float* const* e, bool store) {
  if (K > kBlockMaxK) {
    for (int j = 0; j < nb; ++j) {
      store ? max_and_sum_long_row<true>(z[j], K, t[j], d, m[j], s[j], e[j])
            : max_and_sum_long_row<false>(z[j], K, t[j], d, m[j], s[j], e[j]);
    }
  } else if (nb == kBlock) {
    store ? max_and_sum_J<kBlock, true>(z, K, t, d, m, s, e) : max_and_sum_J<kBlock, false>(z, K, t, d, m, s, e);
  } else {
    store ? max_and_sum_J<1, true>(z, K, t, d, m, s, e) : max_and_sum_J<1, false>(z, K, t, d, m, s, e);
  }
}

inline void max_and_sum_rows(int nb, const double* const* z, int64_t K, const int64_t* t, int64_t d, double* m,
                             double* s, double* const* e, bool store) {
  for (int j = 0; j < nb; ++j) {
    m[j] = max_J(z[j], K, t[j], d);
    const double shift = m[j] == neg_inf<double>() ? 0.0 : m[j];  // all -inf: exp(-inf - 0) = 0, not nan
    s[j] = store ? sum_exp_J<true>(z[j], K, t[j], d, shift, e[j]) : sum_exp_J<false>(z[j], K, t[j], d, shift, e[j]);
  }
}

// e[0, Kp) = exp(z - shift), the gradient's factors for a row of the recompute backward.
inline void exp_row(const float* z, int64_t K, float shift, float* e) {
  const vfloat sh = vsplat(shift);
  const int64_t full = K / kLanes * kLanes;
  for (int64_t k = 0; k < full; k += kLanes) vstore(e + k, fast_exp(vload(z + k) - sh));
  if (full < K) vstore(e + full, fast_exp(vload_tail(z + full, K - full) - sh));
}

inline void exp_row(const double* z, int64_t K, double shift, double* e) {
  for (int64_t k = 0; k < K; ++k) e[k] = fast_exp(z[k] - shift);
}

// Calls f(k, n) over [0, K) in pieces that make the stores to out + k 64-byte aligned (a split
// store costs about two): a head of n < 16, whole chunks of n = 16, a tail of n < 16.
template <typename F>
inline void for_aligned(const float* out, int64_t K, F f) {
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) & 63) / sizeof(float);
  const int64_t head = std::min<int64_t>((kLanes - misalign) % kLanes, K);
  if (head > 0) f(0, head);
  int64_t k = head;
  for (; k + kLanes <= K; k += kLanes) f(k, kLanes);
  if (k < K) f(k, K - k);
}

inline void vstore_n(float* p, vfloat v, int64_t n) {
  if (n == kLanes) {
    vstore(p, v);
  } else {
    vstore_tail(p, v, n);
  }
}

// g = scale * dl/dz of a row from e[j] = exp(z_j - shift): g_j = e_j * (c * scale) for j in J,
// and the targets' own terms. e holds K + 16 values (past K: anything).
template <typename scalar_t, typename T>
void store_grad_row(const T* e, int64_t K, int64_t t, int64_t d, const RowTerms<T>& terms, T scale, scalar_t* g,
                    int64_t stride_k) {
  const T factor = terms.c * scale;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride_k == 1) {
      for_aligned(g, K, [&](int64_t k, int64_t n) { vstore_n(g + k, vload(e + k) * factor, n); });
      g[t] = terms.g_t * scale;
      g[d] = terms.g_d * scale;
      return;
    }
  }
  if (stride_k == 1) {
    for (int64_t k = 0; k < K; ++k) g[k] = static_cast<scalar_t>(e[k] * factor);
  } else {
    for (int64_t k = 0; k < K; ++k) g[k * stride_k] = static_cast<scalar_t>(e[k] * factor);
  }
  g[t * stride_k] = static_cast<scalar_t>(terms.g_t * scale);
  g[d * stride_k] = static_cast<scalar_t>(terms.g_d * scale);
}

// The recompute backward's row when logits and gradient are unit-stride float32 rows: in one pass,
// g = exp(z - shift) * (c * scale), the same lane operations as max_and_sum_J then store_grad_row in
// the fused forward (each lane's value depends on its own input only), so the same bits.
inline void grad_row_direct(const float* z, int64_t K, int64_t t, int64_t d, const RowTerms<float>& terms,
                            float scale, float* g) {
  const float factor = terms.c * scale;
  const vfloat sh = vsplat(terms.shift);
  for_aligned(g, K, [&](int64_t k, int64_t n) {
    const vfloat v = n == kLanes ? vload(z + k) : vload_tail(z + k, n);
    vstore_n(g + k, fast_exp(v - sh) * factor, n);
  });
  g[t] = terms.g_t * scale;
  g[d] = terms.g_d * scale;
}

// A 64-byte aligned scratch array of n values, and 16 more.
template <typename T>
struct Scratch {
  std::vector<T> storage;
  T* data;
  explicit Scratch(int64_t n) : storage(n + 2 * kLanes) {
    const auto address = reinterpret_cast<uintptr_t>(storage.data());
    data = storage.data() + ((64 - address % 64) % 64) / sizeof(T);
  }
};

template <typename scalar_t>
void fill_row(scalar_t* g, int64_t K, int64_t stride_k, scalar_t value) {
  for (int64_t k = 0; k < K; ++k) g[k * stride_k] = value;
}

// Rows per parallel task: ~16k elements' work (a row counting ~32 more for its row math, ~10 us),
// more than starting and joining a thread costs: the forward with gradient at (512, 51) fp32 on 2
// threads took 30.6 us in two tasks against 42.3 us in one (a 64k grain; issue 11).
int64_t grain_rows(int64_t K) { return std::max<int64_t>(kLanes, 16384 / (K + 32)); }

// Rows per group in the fused forward, whose exponentials wait in a buffer for the row terms:
// 16 (the lanes), fewer when 16 rows would not fit in ~64 KB.
int64_t group_rows(int64_t Kp, bool write_grad) {
  return write_grad ? std::clamp<int64_t>(16384 / Kp, 1, kLanes) : kLanes;
}

// ---------------------------------------------------------------------------------------------
// Pixel layout. The per-pixel rows of a contiguous (N, K, d1..dk) tensor (NCHW) are the (N, S, K)
// view with stride_s = 1 and stride_k = S: a row's outputs lie S apart, while output k of 16
// consecutive pixels is 16 adjacent values. Read row by row, every value costs a cache line (and,
// from S = 1024 fp32 on, a page): (2, 51, 64, 64) fp32 took 6.7x F.cross_entropy's time (issue 19).
// So 16 consecutive pixels of one image are the 16 lanes of a pixel group, and the loops run over
// k with one vector load of column k: J's max, then the sum of the exponentials, then the group's
// row terms in one row_terms_lanes call, then the gradient column by column (the gradient, from
// empty_like, has the logits' layout). Groups stop at image boundaries: the last group of an image
// loads and stores its n < 16 lanes under a mask. Lanes whose row does not count (ignored, bad
// target, past the image) are computed on whatever they hold and dropped by selects, so inf / nan
// logits there give a gradient of exactly 0.
//
// The sum adds a row's terms in the order of the row path: column k goes to accumulator k % 16 of
// split u(k) (max_and_sum_J: one split; max_and_sum_long_row: kSplit), and the accumulators are
// added in that path's tree (sum_lanes). J's max is exact in any order. So every row gets the bits
// the row path gives it: NCHW and channels_last logits give the same loss, row terms and gradient.

// Column k of a group: its n <= 16 values as float lanes (-inf past n). float16 converts with one
// instruction where the target has it, rounding to nearest even as c10::Half does (lane by lane,
// the fp16 op took 1.45 ms at (2, 51, 64, 64) on 1 thread, against 0.45 ms).
template <typename scalar_t>
inline vfloat load_lanes(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return n == kLanes ? vload(p) : vload_tail(p, n);
  } else {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      if (n == kLanes) return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
#endif
    vfloat v = vsplat(neg_inf<float>());
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
}

template <typename scalar_t>
inline void store_lanes(scalar_t* p, vfloat v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    vstore_n(p, v, n);
  } else {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      if (n == kLanes) {
        const __m256i h = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
        return;
      }
    }
#endif
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[i]);
  }
}

// Rows r0 .. r0 + n - 1 of a pixel group and what their targets say.
struct PixelGroup {
  int64_t image, s0, r0, n;  // pixels s0 .. s0 + n - 1 of an image: rows r0 = image * S + s0 ...
  vint t;  // the targets of the rows that count; -1 (no column) in the other lanes
  vint live;  // -1 in the lanes whose row counts (kept, with a valid target)
  vint bad;  // -1 in the lanes whose target is bad
  bool any_live;

  PixelGroup(const TargetView& targets, int64_t image_, int64_t s0_, int64_t S, int64_t K, int64_t d,
             int64_t ignore_index)
      : image(image_),
        s0(s0_),
        r0(image_ * S + s0_),
        n(std::min<int64_t>(kLanes, S - s0_)),
        t(vint{} - 1),
        live(vint{}),
        bad(vint{}) {
    for (int i = 0; i < n; ++i) {
      const int64_t target = targets[r0 + i];
      const TargetCheck check = check_target(target, K, d, ignore_index);
      live[i] = -static_cast<int32_t>(check.kept && !check.bad);
      bad[i] = -static_cast<int32_t>(check.bad);
      t[i] = live[i] ? static_cast<int32_t>(target) : -1;
    }
    int32_t any = 0;
    for (int i = 0; i < kLanes; ++i) any |= live[i];
    any_live = any != 0;
  }

  // The group's first value in a (N, S, K) tensor of the pixel layout (no division).
  int64_t start(const RowLayout& rows) const { return image * rows.stride_n + s0 * rows.stride_s; }

  // Where the row does not count: skipped_row's value (0 where ignored or past n, nan where bad).
  vfloat skipped(float RowTerms<float>::*term) const {
    return bad ? vsplat(skipped_row<float>(true).*term) : vsplat(skipped_row<float>(false).*term);
  }
};

// J's max of each lane (NaN skipped, as in max_and_sum_J), and the lanes' z_t and z_d.
template <typename scalar_t>
void max_J_pixels(const scalar_t* z, int64_t stride_k, int64_t K, int64_t d, const PixelGroup& p, vfloat& m,
                  vfloat& z_t, vfloat& z_d) {
  vfloat acc = vsplat(neg_inf<float>()), zt = vsplat(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    if (k == d) continue;
    const vfloat v = load_lanes(z + k * stride_k, p.n);
    const vint is_t = p.t == static_cast<int32_t>(k);
    zt = is_t ? v : zt;
    acc = is_t ? acc : vmax(v, acc);
  }
  m = acc;
  z_t = zt;
  z_d = load_lanes(z + d * stride_k, p.n);
}

// The sum over J of exp(z - shift) of each lane, added in the row path's order (kSplits = 1 for
// K <= kBlockMaxK, else kSplit); with kStore, e[k * 16 + i] = exp(z_k - shift) of lane i (k != d).
template <int kSplits, bool kStore, typename scalar_t>
vfloat sum_J_pixels(const scalar_t* z, int64_t stride_k, int64_t K, int64_t d, const PixelGroup& p, vfloat shift,
                    float* e) {
  static_assert(kSplits == 1 || kSplits == kSplit);
  vfloat acc[kSplits][kLanes];
  for (auto& split : acc) {
    for (vfloat& a : split) a = vsplat(0.0f);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    // max_and_sum_long_row: whole chunk c to split c % kSplit, the partial last one to the last split.
    const int64_t u = kSplits == 1 || k0 + kLanes > K ? kSplits - 1 : k0 / kLanes % kSplits;
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) {  // unrolled: with one split, the accumulators stay in registers
      const int64_t k = k0 + j;
      if (k == K) break;
      if (k == d) continue;  // the gradient at d is g_d: no exponential needed
      const vfloat ev = fast_exp(load_lanes(z + k * stride_k, p.n) - shift);
      if constexpr (kStore) vstore(e + k * kLanes, ev);
      acc[u][j] += p.t == static_cast<int32_t>(k) ? vsplat(0.0f) : ev;
    }
  }
  vfloat lane[kLanes];  // the splits added as in max_and_sum_long_row, then sum_lanes' tree
  for (int j = 0; j < kLanes; ++j) {
    if constexpr (kSplits == 1) {
      lane[j] = acc[0][j];
    } else {
      lane[j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
    }
  }
  for (int j = 0; j < 8; ++j) lane[j] += lane[j + 8];
  for (int j = 0; j < 4; ++j) lane[j] += lane[j + 4];
  return (lane[0] + lane[2]) + (lane[1] + lane[3]);
}

// The gradient of a pixel group, column by column: e(k) = exp(z_k - shift) of column k's lanes;
// g = e * factor in J, g_t and g_d at the targets (all scaled), the fill where the row does not count.
template <typename scalar_t, typename E>
void store_grad_pixels(scalar_t* g, int64_t stride_k, int64_t K, int64_t d, const PixelGroup& p, vfloat factor,
                       vfloat g_t, vfloat g_d, E e) {
  const vfloat fill = p.bad ? vsplat(quiet_nan<float>()) : vsplat(0.0f);  // as fill_row's
  const vfloat at_d = p.live ? g_d : fill;
  for (int64_t k = 0; k < K; ++k) {
    vfloat v = at_d;
    if (k != d) {
      v = p.t == static_cast<int32_t>(k) ? g_t : e(k) * factor;
      v = p.live ? v : fill;
    }
    store_lanes(g + k * stride_k, v, p.n);
  }
}

// Groups per parallel task: the rows of grain_rows (~16k elements). forward_reduced with gradient
// on 2 threads, min of 15: (1, 151, 16, 16) 18.6 us, against 28.0 with a 64k-element grain (one
// task) and 18.7 with one group a task; (1, 51, 32, 32) 32.4 us, 54.6 on 1 thread.
int64_t grain_groups(int64_t K) { return std::max<int64_t>(1, grain_rows(K) / kLanes); }

// Whether the pixel path takes the rows (and the gradient's): consecutive rows adjacent, outputs
// not, and enough pixels in an image to fill the lanes.
constexpr int64_t kMinPixels = 16;

bool pixel_layout(const RowLayout& rows, const RowLayout& g_rows) {
  return rows.stride_s == 1 && rows.stride_k != 1 && rows.S >= kMinPixels && g_rows.stride_s == 1;
}

// Calls f(group, scratch) for the pixel groups of all images, in parallel; scratch: a 64-byte
// aligned buffer of scratch_floats floats per task.
template <typename F>
void for_pixel_groups(const RowLayout& rows, const TargetView& targets, int64_t d, int64_t ignore_index,
                      int64_t scratch_floats, F f) {
  const int64_t S = rows.S, per_image = (S + kLanes - 1) / kLanes;
  at::parallel_for(0, rows.R / S * per_image, grain_groups(rows.K), [&](int64_t begin, int64_t end) {
    Scratch<float> scratch(scratch_floats);
    int64_t image = begin / per_image, s0 = begin % per_image * kLanes;  // one division a task, not a group
    for (int64_t i = begin; i < end; ++i) {
      f(PixelGroup(targets, image, s0, S, rows.K, d, ignore_index), scratch.data);
      s0 += kLanes;
      if (s0 >= S) s0 = 0, ++image;
    }
  });
}

// RowLanes::clear()'s values in every lane, for the lanes of a group whose row does not count.
const RowLanes<float> kCleared = [] {
  RowLanes<float> q{};
  for (int i = 0; i < kLanes; ++i) q.clear(i);
  return q;
}();

// forward_rows in the pixel layout (float, bfloat16 and float16 logits; float math).
template <typename scalar_t>
void forward_pixels(const RowLayout& rows, const scalar_t* x, const TargetView& targets, const Hyper& hp,
                    float* loss, float* stats, scalar_t* g, const RowLayout& g_rows, float scale) {
  const int64_t K = rows.K, d = hp.drainage_idx, ignore_index = hp.ignore_index;
  const bool write_grad = g != nullptr;
  for_pixel_groups(rows, targets, d, ignore_index, write_grad ? K * kLanes : 0, [&](const PixelGroup& p, float* e) {
    const scalar_t* z = x + p.start(rows);
    RowLanes<float> q{};  // zeros where no row counts
    if (p.any_live) {
      vfloat m, z_t, z_d;
      max_J_pixels(z, rows.stride_k, K, d, p, m, z_t, z_d);
      const vfloat shift = m == vsplat(neg_inf<float>()) ? vsplat(0.0f) : m;  // all -inf: exp(-inf - 0) = 0
      vfloat s;
      if (K > kBlockMaxK) {
        s = write_grad ? sum_J_pixels<kSplit, true>(z, rows.stride_k, K, d, p, shift, e)
                       : sum_J_pixels<kSplit, false>(z, rows.stride_k, K, d, p, shift, e);
      } else {
        s = write_grad ? sum_J_pixels<1, true>(z, rows.stride_k, K, d, p, shift, e)
                       : sum_J_pixels<1, false>(z, rows.stride_k, K, d, p, shift, e);
      }
      vstore(q.z_t, p.live ? z_t : vload(kCleared.z_t));
      vstore(q.z_d, p.live ? z_d : vload(kCleared.z_d));
      vstore(q.m, p.live ? m : vload(kCleared.m));
      vstore(q.s, p.live ? s : vload(kCleared.s));
      const vint infinite_max = p.live & (m == vsplat(-neg_inf<float>()));
      for (int i = 0; i < kLanes; ++i) {
        if (infinite_max[i]) {
          q.s[i] = sum_exp_slow(z + i, rows.stride_k, K, p.t[i], d, q.m[i], write_grad ? e + i : nullptr, kLanes);
        }
      }
      for (int i = 0; hp.weight.ptr != nullptr && i < p.n; ++i) {
        if (p.live[i]) q.w[i] = hp.weight.at<float>(p.r0 + i);
      }
      row_terms_lanes(q, hp);
    }
    store_lanes(loss + p.r0, p.live ? vload(q.loss) : p.skipped(&RowTerms<float>::loss), p.n);
    if (stats != nullptr) {
      const vfloat terms[kRowTerms] = {p.live ? vload(q.shift) : p.skipped(&RowTerms<float>::shift),
                                       p.live ? vload(q.c) : p.skipped(&RowTerms<float>::c),
                                       p.live ? vload(q.g_t) : p.skipped(&RowTerms<float>::g_t),
                                       p.live ? vload(q.g_d) : p.skipped(&RowTerms<float>::g_d)};
      for (int j = 0; j < kRowTerms; ++j) store_lanes(stats + j * rows.R + p.r0, terms[j], p.n);
    }
    if (!write_grad) return;
    store_grad_pixels(g + p.start(g_rows), g_rows.stride_k, K, d, p, vload(q.c) * scale, vload(q.g_t) * scale,
                      vload(q.g_d) * scale, [&](int64_t k) { return vload(e + k * kLanes); });
  });
}

// backward_rows in the pixel layout: the terms of the group's rows and the upstream gradient in
// lanes, then the gradient column by column, exp(z - shift) * (c * scale) as in grad_row_direct.
template <typename scalar_t>
void backward_pixels(const RowLayout& rows, const scalar_t* x, const TargetView& targets, const float* stats,
                     const float* dy, int64_t dy_stride, int64_t d, int64_t ignore_index, scalar_t* g,
                     const RowLayout& g_rows) {
  const int64_t K = rows.K, R = rows.R;
  for_pixel_groups(rows, targets, d, ignore_index, 0, [&](const PixelGroup& p, float*) {
    alignas(64) float terms[kRowTerms][kLanes] = {}, scale[kLanes] = {};
    for (int i = 0; i < p.n; ++i) {
      for (int j = 0; j < kRowTerms; ++j) terms[j][i] = stats[j * R + p.r0 + i];
      scale[i] = dy[(p.r0 + i) * dy_stride];
    }
    const vfloat shift = vload(terms[0]), sc = vload(scale);
    bool inf_shift = false;  // some lane's J has +inf: 1 where z == shift, as backward_rows
    for (int i = 0; i < p.n; ++i) inf_shift |= terms[0][i] == -neg_inf<float>();
    const scalar_t* z = x + p.start(rows);
    store_grad_pixels(g + p.start(g_rows), g_rows.stride_k, K, d, p, vload(terms[1]) * sc, vload(terms[2]) * sc,
                      vload(terms[3]) * sc, [&](int64_t k) {
                        const vfloat v = load_lanes(z + k * rows.stride_k, p.n), e = fast_exp(v - shift);
                        return inf_shift ? (v == shift ? vsplat(1.0f) : e) : e;
                      });
  });
}

// forward, and forward_with_grad when `grad` is defined: then grad = grad_scale * d(sum loss)/dx.
// An undefined `stats` is not written (the reduced path keeps no row terms).
template <typename scalar_t>
void forward_rows(const at::Tensor& x3, const at::Tensor& target, const Hyper& hp, const at::Tensor& loss,
                  const at::Tensor& stats, const at::Tensor& grad, double grad_scale) {
  using T = at::opmath_type<scalar_t>;  // float for the half types, else the type itself
  const RowLayout rows = layout_of(x3);
  const TargetView targets = target_view(target);
  const scalar_t* x = x3.const_data_ptr<scalar_t>();
  T* loss_p = loss.mutable_data_ptr<T>();
  T* stats_p = stats.defined() ? stats.mutable_data_ptr<T>() : nullptr;  // undefined: not written
  const bool write_grad = grad.defined();
  scalar_t* g = write_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const RowLayout g_rows = write_grad ? layout_of(grad) : rows;
  const int64_t R = rows.R, K = rows.K, Kp = padded(K);
  const int64_t G = group_rows(Kp, write_grad);
  const int64_t d = hp.drainage_idx, ignore_index = hp.ignore_index;
  const T scale = static_cast<T>(grad_scale);
  if constexpr (std::is_same_v<T, float>) {
    if (pixel_layout(rows, g_rows)) {
      forward_pixels(rows, x, targets, hp, loss_p, stats_p, g, g_rows, scale);
      return;
    }
  }

  at::parallel_for(0, R, grain_rows(K), [&](int64_t begin, int64_t end) {
    std::vector<T> z_buffer(kBlock * K);  // rows converted to T (only when not float, unit stride)
    Scratch<T> e_buffer(write_grad ? G * Kp : 0);
    RowLanes<T> q;
    int64_t ts[kLanes];
    TargetCheck checks[kLanes];
    for (int64_t r0 = begin; r0 < end; r0 += G) {
      const int n = static_cast<int>(std::min(G, end - r0));
      for (int i = 0; i < kLanes; ++i) q.clear(i);
      // The group's rows that count (kept, with a valid target): only they are read.
      int live[kLanes];
      int n_live = 0;
      for (int i = 0; i < n; ++i) {
        ts[i] = targets[r0 + i];
        checks[i] = check_target(ts[i], K, d, ignore_index);
        if (!checks[i].kept || checks[i].bad) continue;
        live[n_live++] = i;
        if (hp.weight.ptr != nullptr) q.w[i] = hp.weight.at<T>(r0 + i);
      }
      for (int b = 0; b < n_live;) {
        const int nb = K <= kBlockMaxK && n_live - b >= kBlock ? kBlock : 1;
        const T* z[kBlock];
        T* e[kBlock];
        int64_t t[kBlock];
        T m[kBlock], s[kBlock];
        for (int j = 0; j < nb; ++j) {
          const int i = live[b + j];
          t[j] = ts[i];
          z[j] = load_row(x + rows.start(r0 + i), K, rows.stride_k, z_buffer.data() + j * K);
          e[j] = write_grad ? e_buffer.data + i * Kp : nullptr;
        }
        max_and_sum_rows(nb, z, K, t, d, m, s, e, write_grad);
        for (int j = 0; j < nb; ++j) {  // the other lanes keep clear()'s values
          const int i = live[b + j];
          q.z_t[i] = z[j][t[j]];
          q.z_d[i] = z[j][d];
          q.m[i] = m[j];
          q.s[i] = m[j] == -neg_inf<T>() ? sum_exp_slow(z[j], 1, K, t[j], d, m[j], e[j], 1) : s[j];
        }
        b += nb;
      }
      row_terms_lanes(q, hp);
      for (int i = 0; i < n; ++i) {
        const int64_t r = r0 + i;
        const TargetCheck check = checks[i];
        const RowTerms<T> terms = check.kept && !check.bad ? q.terms(i) : skipped_row<T>(check.bad);
        loss_p[r] = terms.loss;
        if (stats_p != nullptr) {
          stats_p[r] = terms.shift;
          stats_p[R + r] = terms.c;
          stats_p[2 * R + r] = terms.g_t;
          stats_p[3 * R + r] = terms.g_d;
        }
        if (!write_grad) continue;
        scalar_t* g_row = g + g_rows.start(r);
        if (!check.kept) {
          fill_row(g_row, K, g_rows.stride_k, scalar_t(0));  // a select: inf / nan logits give 0
        } else if (check.bad) {
          fill_row(g_row, K, g_rows.stride_k, static_cast<scalar_t>(quiet_nan<T>()));
        } else {
          store_grad_row(e_buffer.data + i * Kp, K, ts[i], d, terms, scale, g_row, g_rows.stride_k);
        }
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
  const int64_t R = rows.R, K = rows.K, Kp = padded(K);
  if constexpr (std::is_same_v<T, float>) {
    if (pixel_layout(rows, g_rows)) {
      backward_pixels(rows, x, targets, stats_p, dy, dy_stride, d, ignore_index, g, g_rows);
      return;
    }
  }

  at::parallel_for(0, R, grain_rows(K), [&](int64_t begin, int64_t end) {
    std::vector<T> z_buffer(K);
    Scratch<T> e_buffer(Kp);
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
        const T scale = dy[r * dy_stride];
        // J's max is +inf: exp(z - shift) is 1 where z == shift, not nan, as the forward's terms
        // (sum_exp_slow); the rest of such a row is 0 (its c is finite for some members).
        const bool inf_shift = terms.shift == -neg_inf<T>();
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (rows.stride_k == 1 && g_rows.stride_k == 1 && !inf_shift) {
            grad_row_direct(x + rows.start(r), K, t, d, terms, scale, g_row);
            continue;
          }
        }
        const T* z = load_row(x + rows.start(r), K, rows.stride_k, z_buffer.data());
        exp_row(z, K, terms.shift, e_buffer.data);
        if (inf_shift) sum_exp_slow(z, 1, K, t, d, terms.shift, e_buffer.data, 1);
        store_grad_row(e_buffer.data, K, t, d, terms, scale, g_row, g_rows.stride_k);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x3, const at::Tensor& target, double h1, double h2,
                                               int64_t drainage_idx, int64_t ignore_index, int64_t member,
                                               const std::optional<at::Tensor>& weight) {
  const Hyper hp = check_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts), stats = at::empty({kRowTerms, R}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_forward_cpu", [&] {
    forward_rows<scalar_t>(x3, target, hp, loss, stats, at::Tensor(), 1.0);
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_with_grad_cpu(
    const at::Tensor& x3, const at::Tensor& target, const std::optional<at::Tensor>& scale, double h1, double h2,
    int64_t drainage_idx, int64_t ignore_index, int64_t member, const std::optional<at::Tensor>& weight) {
  const Hyper hp = check_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts), stats = at::empty({kRowTerms, R}, opts);
  at::Tensor grad = at::empty_like(x3);  // keeps a dense input's layout (e.g. channels_last)
  check_scale(x3, scale);
  // The gradient's factor (1 / count for a mean), in the compute type: converting it to T is exact.
  const double factor = scale.has_value() ? scale->item<double>() : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_forward_with_grad_cpu", [&] {
    forward_rows<scalar_t>(x3, target, hp, loss, stats, grad, factor);
  });
  return {loss, stats, grad};
}

// The row losses, and x3 overwritten with the gradient of their sum. In place is safe in forward_rows:
// a group of rows (or of pixels) is read whole (max, sum, z_t, z_d, the exponentials into a scratch
// buffer) before its gradient is stored, and a group writes only its own rows.
at::Tensor forward_grad_cpu(at::Tensor& x3, const at::Tensor& target, double h1, double h2, int64_t drainage_idx,
                            int64_t ignore_index, int64_t member, const std::optional<at::Tensor>& weight) {
  const Hyper hp = check_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
  at::assert_no_internal_overlap(x3);  // an expanded view: several rows would write one memory
  if (weight.has_value()) at::assert_no_overlap(x3, *weight);
  at::Tensor loss = at::empty({x3.size(0) * x3.size(1)}, x3.options().dtype(loss_type(x3)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_forward_grad_cpu", [&] {
    forward_rows<scalar_t>(x3, target, hp, loss, at::Tensor(), x3, 1.0);
  });
  return loss;
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

// Neumaier's compensated running sum in double; plain when not finite (the compensation of an inf
// would make it nan).
struct CompensatedSum {
  double sum = 0.0, compensation = 0.0;

  void add(double v) {
    const double next = sum + v;
    compensation += std::abs(sum) >= std::abs(v) ? (sum - next) + v : (v - next) + sum;
    sum = next;
  }
  double value() const { return std::isfinite(sum) ? sum + compensation : sum; }
};

// The sum of value(i), i < n, with the same bits for any thread count: chunks of a fixed kSumChunk
// values summed in parallel, each in order with compensation, then the chunks' sums in order (float
// rows: far below a float ulp, so the final rounding is the only error that shows; double rows:
// within an ulp or two). In parallel because a per-pixel loss has millions of rows (~1.7 ns a row on
// one core).
template <typename F>
double sum_in_order(int64_t n, F value) {
  constexpr int64_t kSumChunk = int64_t(1) << 16;
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> chunk_sums(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      CompensatedSum acc;
      const int64_t stop = std::min(n, (c + 1) * kSumChunk);
      for (int64_t i = c * kSumChunk; i < stop; ++i) acc.add(value(i));
      chunk_sums[c] = acc.value();
    }
  });
  CompensatedSum total;
  for (const double v : chunk_sums) total.add(v);
  return total.value();
}

// The kept targets of t[r * stride], r < n, and whether any is bad: check_target's test in integer
// arithmetic (a negative target is a huge unsigned one), so that the loop vectorises: in a profile
// of forward_reduced at (2, 21, 128, 128) on 1 thread, 2.0% of the samples with TargetCheck, 0.3%.
template <typename I>
std::pair<int64_t, bool> count_targets(const I* t, int64_t stride, int64_t n, int64_t K, int64_t d,
                                       int64_t ignore_index) {
  int64_t kept = 0, bad = 0;
  auto add = [&](int64_t target) {
    const int64_t k = target != ignore_index;
    kept += k;
    bad |= k & ((static_cast<uint64_t>(target) >= static_cast<uint64_t>(K)) | (target == d));
  };
  if (stride == 1) {
    for (int64_t r = 0; r < n; ++r) add(t[r]);
  } else {
    for (int64_t r = 0; r < n; ++r) add(t[r * stride]);
  }
  return {kept, bad != 0};
}

// The kept count, after checking every target as the Python API does (drainage_fast/_inputs.py,
// check_target_values, with the same message): the eager mean / sum of the "cpp" backend skips the
// host check there, because a small batch pays per op, and here it is one pass over 8 bytes a row
// (a per-pixel loss has millions of rows); the first bad target is looked for only when there is one.
int64_t check_and_count_targets(const at::Tensor& target, int64_t K, int64_t d, int64_t ignore_index) {
  const TargetView targets = target_view(target);
  const int64_t R = target.numel();
  const auto [kept, any_bad] =
      targets.is_int64 ? count_targets(static_cast<const int64_t*>(targets.ptr), targets.stride, R, K, d, ignore_index)
                       : count_targets(static_cast<const int32_t*>(targets.ptr), targets.stride, R, K, d, ignore_index);
  for (int64_t r = 0; any_bad && r < R; ++r) {
    const int64_t t = targets[r];
    if (!check_target(t, K, d, ignore_index).bad) continue;
    const std::string what = t == d ? "equals drainage_idx" : "is out of range [0, " + std::to_string(K) + ")";
    const char* hint = t == d ? " (a classifier for C classes needs K = C + 1 outputs: C class logits and the "
                                "drainage output)"
                              : "";
    TORCH_CHECK_INDEX(false, "target value ", t, " ", what, "; targets must be class indices in [0, ", K,
                      ") other than drainage_idx=", d, ", or ignore_index=", ignore_index, hint);
  }
  return kept;
}

// The divisor of a weighted mean: the sum of the kept rows' weights, each as T (the dtype the rows
// are weighted in, as _inputs.kept_total), in double in sum_in_order's fixed order; after checking
// every weight as the Python API does (_inputs.check_sample_weight, WEIGHT_MESSAGE's words): finite
// and >= 0, else a ValueError naming the first bad value.
template <typename T>
double check_and_sum_weights(const WeightView& w, const TargetView& targets, int64_t R, int64_t ignore_index) {
  std::atomic<bool> any_bad{false};
  auto good = [](double v) { return v >= 0.0 && v <= std::numeric_limits<double>::max(); };  // false for nan
  const double sum = sum_in_order(R, [&](int64_t r) {
    const double v = w.at<double>(r);  // exact for every float dtype
    if (!good(v)) any_bad.store(true, std::memory_order_relaxed);
    return targets[r] != ignore_index ? static_cast<double>(static_cast<T>(v)) : 0.0;
  });
  for (int64_t r = 0; any_bad.load() && r < R; ++r) {
    const double v = w.at<double>(r);
    TORCH_CHECK_VALUE(good(v), "drainage_fast: every sample_weight must be finite and >= 0, got ", v);
  }
  return sum;
}

// backends.Backend.forward_reduced for CPU tensors in one call: the target (and weight) check and
// the divisor (the kept count, or the kept rows' weight sum), the forward with the gradient of the
// reduced loss (1 / divisor applied in the pass) and the reduction. The Python version of the same
// steps cost ~60 us of op overhead at (512, 51), more than the kernel.
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> forward_reduced_cpu(
    const at::Tensor& x3, const at::Tensor& target, bool mean, bool with_grad, double h1, double h2,
    int64_t drainage_idx, int64_t ignore_index, int64_t member, const std::optional<at::Tensor>& weight) {
  const Hyper hp = check_forward(x3, target, h1, h2, drainage_idx, ignore_index, member, weight);
  const int64_t count = check_and_count_targets(target, x3.size(2), drainage_idx, ignore_index);
  const int64_t R = x3.size(0) * x3.size(1);
  const auto opts = x3.options().dtype(loss_type(x3));
  at::Tensor loss = at::empty({R}, opts);
  at::Tensor grad = with_grad ? at::empty_like(x3) : at::Tensor();
  at::Tensor inv_count = at::empty({1}, opts), out = at::empty({}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "drainage_forward_reduced_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const bool weighted = hp.weight.ptr != nullptr;
    const double divisor = weighted ? check_and_sum_weights<T>(hp.weight, target_view(target), R, ignore_index)
                                    : static_cast<double>(count);
    // 1 / divisor rounded once to the loss dtype, which the recompute path (a second backward)
    // scales by too; for a count, an IEEE division in T: the bits of torch.reciprocal(count.to(T)).
    const T inv = weighted ? static_cast<T>(1.0 / divisor) : T(1) / static_cast<T>(count);
    inv_count.mutable_data_ptr<T>()[0] = inv;
    forward_rows<scalar_t>(x3, target, hp, loss, at::Tensor(), grad, mean ? static_cast<double>(inv) : 1.0);
    // The sum, then the mean over the kept rows (nan when none is kept), each rounded once to T.
    const T* rows = loss.const_data_ptr<T>();
    const double total = sum_in_order(R, [&](int64_t r) { return static_cast<double>(rows[r]); });
    out.mutable_data_ptr<T>()[0] = static_cast<T>(mean ? total / divisor : total);
  });
  return {out, mean ? std::optional<at::Tensor>(inv_count) : std::nullopt,
          with_grad ? std::optional<at::Tensor>(grad) : std::nullopt};
}

// On the CPU reading the scale costs nothing (there is no device to wait for).
void scale_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "drainage_fast: scale must have one element, got ", scale.numel());
  if (scale.item<double>() != 1.0) grad.mul_(scale.reshape({}));
}

// scale_by_ on the CPU: grad *= grad_out * pending (None: 1), the factor in the loss dtype;
// nothing when it is exactly 1, nor when pending is infinite (1 / count with no row counted: the
// gradient is all zeros, which g * inf would turn into nan), as the CUDA kernel.
void scale_by_cpu(const at::Tensor& grad, const at::Tensor& grad_out, const std::optional<at::Tensor>& pending) {
  TORCH_CHECK(grad_out.numel() == 1 && (!pending.has_value() || pending->numel() == 1),
              "drainage_fast: grad_out and pending must have one element");
  // loss.backward(): grad_out is a float 1 and nothing is pending; read in place (item() and the
  // reshape below are an op each, ~2 us of a (512, 51) step).
  if (!pending.has_value() && grad_out.scalar_type() == at::kFloat && *grad_out.const_data_ptr<float>() == 1.0f) {
    return;
  }
  if (pending.has_value() && std::isinf(pending->item<double>())) return;
  const at::Tensor factor =
      pending.has_value() ? grad_out.reshape({}).mul(pending->reshape({})) : grad_out.reshape({});
  if (factor.item<double>() != 1.0) grad.mul_(factor);
}

}  // namespace
}  // namespace drainage::cpu

TORCH_LIBRARY_IMPL(drainage_fast, CPU, m) {
  m.impl("forward", &drainage::cpu::forward_cpu);
  m.impl("backward", &drainage::cpu::backward_cpu);
  m.impl("forward_with_grad", &drainage::cpu::forward_with_grad_cpu);
  m.impl("forward_grad_", &drainage::cpu::forward_grad_cpu);
  m.impl("scale_", &drainage::cpu::scale_cpu);
  m.impl("forward_reduced", &drainage::cpu::forward_reduced_cpu);
  m.impl("scale_by_", &drainage::cpu::scale_by_cpu);
}
