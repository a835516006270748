// What the CPU kernels (drainage_cpu.cpp) offer the rest of csrc/cpu: the reduced forward that the
// C++ autograd node of reduced_loss (autograd_cpu.cpp) runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace drainage::cpu {

// The op forward_reduced (schema and contract in ../drainage.cpp): out, inv_count (mean only) and,
// when with_grad, the gradient of out shaped like x3.
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> forward_reduced_cpu(
    const at::Tensor& x3, const at::Tensor& target, bool mean, bool with_grad, double log_alpha, double log_beta,
    int64_t drainage_idx, int64_t ignore_index);

}  // namespace drainage::cpu
