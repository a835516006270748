// The eager mean / sum loss of the "cpp" backend as one op with its own C++ autograd node:
//   reduced_loss(logits, target, mean, log_alpha, log_beta, drainage_idx, ignore_index) -> 0-dim loss
// (schema in ../drainage.cpp). logits is the user's (N, K, d1..dk) tensor, target (N, d1..dk).
//
// Why C++: at (512, 51) the kernels take ~50 us, and the Python torch.autograd.Function around
// them took ~70 us more (apply ~17 us, the Python backward node ~45 us), which made the step slower
// than F.cross_entropy's (benchmarks/results/cpu_vs_cross_entropy.md). Here the whole step has one
// Python call, and loss.backward() hands out the gradient the forward wrote without entering Python.
//
// The semantics are those of DrainageFunction's fused path (drainage_fast/_function.py):
//   * the forward writes the gradient of the reduced loss (1 / count applied in the pass) while the
//     row is in cache, only when autograd will want it (grad mode on and logits requiring grad);
//   * the backward hands that buffer out once, scaled in place by the upstream gradient unless it is
//     exactly 1; a second backward through the graph (retain_graph=True) computes it again;
//   * first order only: under create_graph=True the gradient is tied to the logits through a node
//     whose backward raises, so only a use that differentiates the loss's gradient fails.
// Below autograd (torch.inference_mode) the CPU kernel runs the forward alone.
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "drainage_cpu.h"

namespace drainage::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The same sentence as drainage_fast/_function.py HIGHER_ORDER_MESSAGE (tests/test_api.py checks
// the error of every backend, and tests/test_csrc.py that the two texts agree).
constexpr const char* kHigherOrderMessage =
    "fused_drainage_loss has a hand-written first-order backward only: it cannot be differentiated "
    "twice (create_graph=True, gradgradcheck, Hessians) nor run under torch.func transforms (grad, vmap, "
    "jacrev, ...). Use drainage_fast.drainage_loss_reference, the pure-PyTorch loss, for those.";

// (N, K, d1..dk) -> the (N, S, K) rows view of drainage_fast/_inputs.py as_rows (S = d1 * ... * dk).
at::Tensor as_rows(const at::Tensor& logits) {
  if (logits.dim() == 2) return logits.unsqueeze(1);
  int64_t S = 1;
  for (int64_t i = 2; i < logits.dim(); ++i) S *= logits.size(i);
  return logits.movedim(1, -1).reshape({logits.size(0), S, logits.size(1)});
}

// The inverse of as_rows for a (N, S, K) tensor: back to `sizes`, as a view (_inputs.from_rows).
at::Tensor from_rows(const at::Tensor& rows, at::IntArrayRef sizes) {
  if (sizes.size() == 2) return rows.squeeze(1);
  std::vector<int64_t> last_k(sizes.begin(), sizes.end());
  last_k.erase(last_k.begin() + 1);
  last_k.push_back(sizes[1]);
  return rows.reshape(last_k).movedim(-1, 1);
}

// The gradient of the loss, on its way to the logits: identity, and a backward that raises.
struct NoSecondOrder : public torch::autograd::Function<NoSecondOrder> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& /*logits*/) {
    return grad;
  }
  static variable_list backward(AutogradContext*, variable_list) { TORCH_CHECK(false, kHigherOrderMessage); }
};

struct ReducedLoss : public torch::autograd::Function<ReducedLoss> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target, bool mean,
                            bool with_grad, double log_alpha, double log_beta, int64_t drainage_idx,
                            int64_t ignore_index) {
    const at::Tensor rows_target = target.reshape({-1});
    auto [out, inv_count, grad] = forward_reduced_cpu(as_rows(logits), rows_target, mean, with_grad, log_alpha,
                                                      log_beta, drainage_idx, ignore_index);
    if (with_grad) {
      ctx->save_for_backward({logits, rows_target});
      ctx->saved_data["grad"] = from_rows(*grad, logits.sizes());
      ctx->saved_data["mean"] = mean;
      ctx->saved_data["log_alpha"] = log_alpha;
      ctx->saved_data["log_beta"] = log_beta;
      ctx->saved_data["drainage_idx"] = drainage_idx;
      ctx->saved_data["ignore_index"] = ignore_index;
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved.at(0);
    at::Tensor grad;
    {
      at::NoGradGuard no_grad;
      at::IValue& written = ctx->saved_data["grad"];
      if (written.isTensor()) {
        grad = written.toTensor();  // handed out once: the caller may accumulate into it
        written = at::IValue();
      } else {  // a second backward through the same graph
        const auto& data = ctx->saved_data;
        auto [out, inv_count, again] = forward_reduced_cpu(
            as_rows(logits), saved.at(1), data.at("mean").toBool(), /*with_grad=*/true,
            data.at("log_alpha").toDouble(), data.at("log_beta").toDouble(), data.at("drainage_idx").toInt(),
            data.at("ignore_index").toInt());
        grad = from_rows(*again, logits.sizes());
      }
      // A CPU scalar is read for free: loss.backward() (an upstream gradient of 1) costs no op.
      const at::Tensor& grad_out = grad_outputs.at(0);
      if (grad_out.item<double>() != 1.0) grad.mul_(grad_out);
    }
    if (at::GradMode::is_enabled()) grad = NoSecondOrder::apply(grad, logits);  // create_graph=True
    variable_list grads(8);
    grads[0] = grad;
    return grads;
  }
};

at::Tensor reduced_loss_autograd(const at::Tensor& logits, const at::Tensor& target, bool mean, double log_alpha,
                                 double log_beta, int64_t drainage_idx, int64_t ignore_index) {
  const bool with_grad = at::GradMode::is_enabled() && logits.requires_grad();
  return ReducedLoss::apply(logits, target, mean, with_grad, log_alpha, log_beta, drainage_idx, ignore_index);
}

at::Tensor reduced_loss_cpu(const at::Tensor& logits, const at::Tensor& target, bool mean, double log_alpha,
                            double log_beta, int64_t drainage_idx, int64_t ignore_index) {
  return std::get<0>(forward_reduced_cpu(as_rows(logits), target.reshape({-1}), mean, /*with_grad=*/false,
                                         log_alpha, log_beta, drainage_idx, ignore_index));
}

}  // namespace
}  // namespace drainage::cpu

TORCH_LIBRARY_IMPL(drainage_fast, CPU, m) { m.impl("reduced_loss", &drainage::cpu::reduced_loss_cpu); }

TORCH_LIBRARY_IMPL(drainage_fast, AutogradCPU, m) {
  m.impl("reduced_loss", &drainage::cpu::reduced_loss_autograd);
}
