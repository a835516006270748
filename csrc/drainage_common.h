// Host-side argument checks and the row / target views shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>

#include "row_math.h"

namespace drainage {

// The (N, S, K) view of the logits as R = N * S rows: row r = n * S + s starts at
// n * stride_n + s * stride_s; its outputs are stride_k apart. All offsets are int64.
struct RowLayout {
  int64_t R, S, K, stride_n, stride_s, stride_k;

  DRAINAGE_HD int64_t start(int64_t r) const {
    const int64_t n = r / S;
    return n * stride_n + (r - n * S) * stride_s;
  }
};

inline RowLayout layout_of(const at::Tensor& x3) {
  const int64_t S = x3.size(1);
  return {x3.size(0) * S, S > 0 ? S : 1, x3.size(2), x3.stride(0), x3.stride(1), x3.stride(2)};
}

// (R,) int32 or int64 targets with any stride.
struct TargetView {
  const void* ptr;
  int64_t stride;
  bool is_int64;

  DRAINAGE_HD int64_t operator[](int64_t r) const {
    return is_int64 ? static_cast<const int64_t*>(ptr)[r * stride]
                    : static_cast<int64_t>(static_cast<const int32_t*>(ptr)[r * stride]);
  }
};

inline TargetView target_view(const at::Tensor& target) {
  return {target.data_ptr(), target.stride(0), target.scalar_type() == at::kLong};
}

// A float tensor's dtype as a code that device code can switch on (a one-element factor, the
// sample weights): read in place, converted per element, with no conversion op before the kernel.
enum ScalarKind : int { kKindFloat = 0, kKindDouble = 1, kKindHalf = 2, kKindBFloat16 = 3 };

inline int scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kKindFloat;
    case at::kDouble: return kKindDouble;
    case at::kHalf: return kKindHalf;
    case at::kBFloat16: return kKindBFloat16;
    default: TORCH_CHECK(false, "drainage_fast: expected a float tensor, got ", t.scalar_type());
  }
  return kKindFloat;
}

// p[i] of a float array of the given kind, as T (one rounding, as torch's .to(T)).
template <typename T>
DRAINAGE_HD T load_as(const void* p, int64_t i, int kind) {
  switch (kind) {
    case kKindFloat: return static_cast<T>(static_cast<const float*>(p)[i]);
    case kKindDouble: return static_cast<T>(static_cast<const double*>(p)[i]);
    case kKindHalf: return static_cast<T>(static_cast<float>(static_cast<const at::Half*>(p)[i]));
    default: return static_cast<T>(static_cast<float>(static_cast<const at::BFloat16*>(p)[i]));
  }
}

// (R,) sample weights of any float dtype and stride; ptr null: none (every row weighs 1).
struct WeightView {
  const void* ptr;
  int64_t stride;
  int kind;

  template <typename T>
  DRAINAGE_HD T at(int64_t r) const {
    return load_as<T>(ptr, r * stride, kind);
  }
};

inline WeightView weight_view(const std::optional<at::Tensor>& weight) {
  if (!weight.has_value()) return {nullptr, 0, kKindFloat};
  return {weight->data_ptr(), weight->stride(0), scalar_kind(*weight)};
}

// A member of the family and its arguments, as the ops take them (drainage_fast/_inputs.py Hyper).
struct Hyper {
  double h1, h2;
  int64_t drainage_idx, ignore_index;
  int member;
  WeightView weight;
};

// Row terms a forward saves for the backward: (kRowTerms, R) = [shift, c, g_t, g_d] (row_math.h).
constexpr int64_t kRowTerms = 4;

// Per-row losses and stats are float32, or float64 for float64 logits.
inline at::ScalarType loss_type(const at::Tensor& x3) {
  return x3.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The public API validates every argument (drainage_fast/_inputs.py); these checks guard direct
// calls of the ops against memory errors, not against bad values.
inline void check_rows(const at::Tensor& x3, const at::Tensor& target) {
  TORCH_CHECK(x3.dim() == 3, "drainage_fast: x3 must be (N, S, K), got shape ", x3.sizes());
  TORCH_CHECK(x3.size(2) >= 2, "drainage_fast: rows need K >= 2 outputs, got K=", x3.size(2));
  const auto dtype = x3.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "drainage_fast: logits must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x3.size(0) * x3.size(1),
              "drainage_fast: target must be (R,) with R = N * S = ", x3.size(0) * x3.size(1),
              ", got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "drainage_fast: target must be int64 or int32, got ", target.scalar_type());
  TORCH_CHECK(target.device() == x3.device(), "drainage_fast: target is on ", target.device(),
              " but x3 is on ", x3.device());
}

inline void check_drainage_idx(int64_t drainage_idx, int64_t K) {
  TORCH_CHECK(0 <= drainage_idx && drainage_idx < K, "drainage_fast: drainage_idx=", drainage_idx,
              " must be normalised to [0, ", K, ")");
}

inline void check_stats(const at::Tensor& x3, const at::Tensor& stats, const at::Tensor& grad_rows) {
  const int64_t R = x3.size(0) * x3.size(1);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kRowTerms && stats.size(1) == R && stats.is_contiguous(),
              "drainage_fast: stats must be a contiguous (", kRowTerms, ", ", R, ") tensor, got shape ",
              stats.sizes());
  TORCH_CHECK(stats.scalar_type() == loss_type(x3), "drainage_fast: stats must be ", loss_type(x3),
              ", got ", stats.scalar_type());
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == R,
              "drainage_fast: grad_rows must be (R,) with R = ", R, ", got shape ", grad_rows.sizes());
  TORCH_CHECK(stats.device() == x3.device() && grad_rows.device() == x3.device(),
              "drainage_fast: stats and grad_rows must be on ", x3.device());
}

// The checks of every forward: the rows, drainage_idx, the member and the weights; the op's
// arguments as one Hyper.
inline Hyper check_forward(const at::Tensor& x3, const at::Tensor& target, double h1, double h2, int64_t drainage_idx,
                           int64_t ignore_index, int64_t member, const std::optional<at::Tensor>& weight) {
  check_rows(x3, target);
  check_drainage_idx(drainage_idx, x3.size(2));
  TORCH_CHECK(0 <= member && member < kMembers, "drainage_fast: member=", member, " must be in [0, ", kMembers,
              ") (drainage_fast/_members.py Member)");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == target.size(0),
                "drainage_fast: weight must be (R,) with R = ", target.size(0), ", got shape ", weight->sizes());
    const auto dtype = weight->scalar_type();
    TORCH_CHECK((dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16) &&
                    weight->device() == x3.device(),
                "drainage_fast: weight must be a float16, bfloat16, float32 or float64 tensor on ", x3.device(),
                ", got ", dtype, " on ", weight->device());
  }
  return {h1, h2, drainage_idx, ignore_index, static_cast<int>(member), weight_view(weight)};
}

// forward_with_grad's optional factor: one element of the compute type, on the logits' device.
inline void check_scale(const at::Tensor& x3, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(!scale.has_value() || (scale->numel() == 1 && scale->scalar_type() == loss_type(x3) &&
                                     scale->device() == x3.device()),
              "drainage_fast: scale must be a one-element ", loss_type(x3), " tensor on ", x3.device());
}

}  // namespace drainage
