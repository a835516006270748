// The eager mean / sum loss of the native backends ("cpp", "cuda") as one op with its own C++
// autograd node:
//   reduced_loss(logits, target, mean, h1, h2, drainage_idx, ignore_index, member, weight) -> 0-dim loss
// (schema in drainage.cpp). logits is the user's (N, K, d1..dk) tensor, target (N, d1..dk), weight
// None or shaped like target (sample weights that do not require grad: the API weighs rows in torch
// ops when they do).
//
// Why C++: on the CPU at (512, 51) the kernels take ~30 us, and the Python torch.autograd.Function
// around them took ~70 us more (apply ~17 us, the Python backward node ~45 us), which made the step
// slower than F.cross_entropy's (benchmarks/results/cpu_vs_cross_entropy.md). Here the whole step is
// one Python call, and loss.backward() runs no Python. On a GPU the same layer is host time, which
// at small batches is the whole step.
//
// The node calls the device's kernels through the dispatcher: forward_reduced, then scale_by_ in
// the backward (cpu/drainage_cpu.cpp, cuda/drainage_cuda.cu). So this file has no device code, lives
// in the CPU library, and the CPU tests run the node a GPU runs (all but its pending 1 / count, which
// only CUDA has; tests/test_cuda_reduced.py checks that factor on a GPU). The semantics are those of
// DrainageFunction's fused path (drainage_fast/_function.py):
//   * the forward writes the gradient while each row is at hand, only when autograd will want it
//     (grad mode on and logits requiring grad). On the CPU 1 / count is applied in the pass; on CUDA
//     the count is known only at the end of the pass, so a mean's 1 / count is left pending;
//   * the backward hands that buffer out once, scaled in place by the upstream gradient times what
//     is pending (scale_by_: nothing happens when the factor is exactly 1), and reads no saved
//     tensor; a second backward through the graph (retain_graph=True) runs the forward again on the
//     saved inputs (an in-place change to them since is an error, as for any saved tensor);
//   * first order only: under create_graph=True the gradient is tied to the logits through a node
//     whose backward raises, so only a use that differentiates the loss's gradient fails.
// Below autograd (torch.inference_mode) the CPU / CUDA kernel of this op runs the forward alone.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

namespace drainage {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The same sentence as drainage_fast/_function.py HIGHER_ORDER_MESSAGE (tests/test_api.py checks
// the error of every backend, and tests/test_csrc.py that the two texts agree).
constexpr const char* kHigherOrderMessage =
    "fused_drainage_loss has a hand-written first-order backward only: it cannot be differentiated "
    "twice (create_graph=True, gradgradcheck, Hessians) nor run under torch.func transforms (grad, vmap, "
    "jacrev, ...). Use drainage_fast.drainage_loss_reference (or the member's *_loss_reference), the "
    "pure-PyTorch loss, for those.";

using Reduced = std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>;

// The loss's arguments besides the tensors, as the ops take them.
struct Args {
  bool mean;
  double h1, h2;
  int64_t drainage_idx, ignore_index, member;
};

Reduced forward_reduced(const at::Tensor& x3, const at::Tensor& target, bool with_grad, const Args& a,
                        const std::optional<at::Tensor>& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("drainage_fast::forward_reduced", "")
                             .typed<Reduced(const at::Tensor&, const at::Tensor&, bool, bool, double, double,
                                            int64_t, int64_t, int64_t, const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView kernels_only;  // the op has no autograd of its own: skip the keys
  return op.call(x3, target, a.mean, with_grad, a.h1, a.h2, a.drainage_idx, a.ignore_index, a.member, weight);
}

void scale_by_(const at::Tensor& grad, const at::Tensor& grad_out, const std::optional<at::Tensor>& pending) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("drainage_fast::scale_by_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  op.call(grad, grad_out, pending);
}

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

// The gradient (shaped like the logits) and what the backward still owes it: 1 / count of a mean
// on CUDA (see the top of this file), nothing on the CPU.
struct Written {
  at::Tensor grad;
  std::optional<at::Tensor> pending;
};

// target (and weight) as the (R,) vector of the rows (a view; no op when it is one already).
at::Tensor flat(const at::Tensor& t) { return t.dim() == 1 ? t : t.reshape({-1}); }

Written run_forward(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    bool with_grad, const Args& a, at::Tensor* out) {
  const std::optional<at::Tensor> rows_weight = weight.has_value() ? std::optional(flat(*weight)) : std::nullopt;
  auto [loss, inv_count, grad] = forward_reduced(as_rows(logits), flat(target), with_grad, a, rows_weight);
  if (out != nullptr) *out = loss;
  if (!with_grad) return {};
  const bool count_pending = a.mean && logits.device().type() != c10::DeviceType::CPU;
  return {from_rows(*grad, logits.sizes()), count_pending ? inv_count : std::nullopt};
}

// The gradient of the loss, on its way to the logits: identity, and a backward that raises.
struct NoSecondOrder : public torch::autograd::Function<NoSecondOrder> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& /*logits*/) {
    return grad;
  }
  static variable_list backward(AutogradContext*, variable_list) { TORCH_CHECK(false, kHigherOrderMessage); }
};

// The loss's backward node. A Node of its own rather than a torch::autograd::Function: a Function's
// node is CppNode<ReducedLoss>, and torch prints a grad_fn by what follows the last "::" of its C++
// name, which gave grad_fn=<ReducedLoss>>. Here the node names itself, and saves its tensors as
// torch's generated nodes do (SavedVariable: the version check, and the "backward through the graph
// a second time" error once released).
struct ReducedLossBackward : public torch::autograd::Node {
  std::string name() const override { return "ReducedLossBackward"; }

  variable_list apply(variable_list&& grad_outputs) override {
    // Node's thread-safety contract: apply and release_variables take the node's mutex, as a
    // Function's CppNode does. Two threads' retain_graph backwards through one loss would otherwise
    // both take the one pre-written gradient (and scale it twice).
    std::lock_guard<std::mutex> lock(mutex_);
    Written written;
    {
      at::NoGradGuard no_grad;
      if (grad.defined()) {  // handed out once: the caller may accumulate into it
        written = {std::move(grad), std::move(pending)};
        grad = at::Tensor();
        pending.reset();
      } else {  // a second backward through the same graph: the saved inputs, checked for in-place changes
        const at::Tensor w = weight.unpack();
        written = run_forward(logits.unpack(), target.unpack(), w.defined() ? std::optional(w) : std::nullopt,
                              /*with_grad=*/true, args, nullptr);
      }
      const at::Tensor& grad_out = grad_outputs.at(0);
      if (grad_out.defined()) {
        scale_by_(written.grad, grad_out, written.pending);
      } else {  // no gradient reached the loss: it counts as 0, as a Function's materialised zeros
        written.grad.zero_();
      }
    }
    // create_graph=True: tie the gradient to the logits, so that differentiating it raises.
    if (at::GradMode::is_enabled()) return {NoSecondOrder::apply(written.grad, logits.unpack())};
    return {written.grad};
  }

  // Compiled autograd (torch._dynamo's compiled_autograd): the node is traced with proxies for its
  // saved tensors. It takes the recompute path there (forward_reduced and scale_by_, both with fake
  // kernels): a pre-written buffer handed out of a traced graph would alias the graph's input.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& compiled) const override {
    compiled.collect(logits, false);
    compiled.collect(target, false);
    compiled.collect(weight, false);
    compiled.collect(args.mean);
    compiled.collect(args.h1);
    compiled.collect(args.h2);
    compiled.collect(args.drainage_idx);
    compiled.collect(args.ignore_index);
    compiled.collect(args.member);
  }

  variable_list apply_with_saved(const variable_list& grad_outputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(logits);
    saved.before(target);
    saved.before(weight);
    Written written;
    {
      at::NoGradGuard no_grad;
      const at::Tensor w = weight.unpack();
      written = run_forward(logits.unpack(), target.unpack(), w.defined() ? std::optional(w) : std::nullopt,
                            /*with_grad=*/true, args, nullptr);
      const at::Tensor& grad_out = grad_outputs.at(0);
      if (grad_out.defined()) {
        scale_by_(written.grad, grad_out, written.pending);
      } else {
        written.grad.zero_();
      }
    }
    saved.after(logits);
    saved.after(target);
    saved.after(weight);
    return {written.grad};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    logits.reset_data();
    target.reset_data();
    weight.reset_data();
    grad = at::Tensor();
    pending.reset();
  }

  // Saved for a second backward and for create_graph only; the first backward reads none.
  torch::autograd::SavedVariable logits, target, weight;
  at::Tensor grad;  // the gradient the forward wrote, until the first backward hands it out
  std::optional<at::Tensor> pending;
  Args args{};
};

// torch up to 2.11 (the GPU image's) holds autograd nodes in std::shared_ptr, deleted by deleteNode
// (which frees a long graph without deep recursion); later versions in c10::intrusive_ptr. The node
// is made as the installed torch holds them: picked by the type of Edge::function.
template <class T, class Ptr = decltype(torch::autograd::Edge::function)>
struct MakeNode;

template <class T>
struct MakeNode<T, std::shared_ptr<torch::autograd::Node>> {
  static std::shared_ptr<T> make() {
    // deleteNode(Node*) of torch/csrc/autograd/function.h, found through T's base (a dependent call:
    // it is looked up only where this torch has it).
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  }
};

template <class T>
struct MakeNode<T, c10::intrusive_ptr<torch::autograd::Node>> {
  static c10::intrusive_ptr<T> make() { return c10::make_intrusive<T>(); }
};

at::Tensor reduced_loss_autograd(const at::Tensor& logits, const at::Tensor& target, bool mean, double h1, double h2,
                                 int64_t drainage_idx, int64_t ignore_index, int64_t member,
                                 const std::optional<at::Tensor>& weight) {
  const bool with_grad = at::GradMode::is_enabled() && logits.requires_grad();
  // The node gives the logits their gradient only: a weight's would be silently lost.
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && weight.has_value() && weight->requires_grad()),
                    "drainage_fast: reduced_loss takes sample weights that do not require grad (the fused_* "
                    "losses weigh the rows in torch ops when they do)");
  // Forward-mode AD: a Function raised for want of a jvp; this node has none either, and must say so
  // rather than return a loss without a tangent.
  TORCH_CHECK(!torch::autograd::isFwGradDefined(logits) && !torch::autograd::isFwGradDefined(weight),
              kHigherOrderMessage);
  const Args a{mean, h1, h2, drainage_idx, ignore_index, member};
  at::Tensor out;
  Written written;
  {
    at::AutoGradMode no_grad(false);  // as inside a Function's forward: the row views make no graph
    written = run_forward(logits, target, weight, with_grad, a, &out);
  }
  if (!with_grad) return out;
  auto node = MakeNode<ReducedLossBackward>::make();
  node->set_next_edges(torch::autograd::collect_next_edges(logits));
  node->logits = torch::autograd::SavedVariable(logits, /*is_output=*/false);
  node->target = torch::autograd::SavedVariable(target, false);
  node->weight = torch::autograd::SavedVariable(weight.value_or(at::Tensor()), false);
  node->grad = std::move(written.grad);
  node->pending = std::move(written.pending);
  node->args = a;
  torch::autograd::set_history(out, node);
  return out;
}

at::Tensor reduced_loss_forward(const at::Tensor& logits, const at::Tensor& target, bool mean, double h1, double h2,
                                int64_t drainage_idx, int64_t ignore_index, int64_t member,
                                const std::optional<at::Tensor>& weight) {
  at::Tensor out;
  run_forward(logits, target, weight, /*with_grad=*/false, Args{mean, h1, h2, drainage_idx, ignore_index, member},
              &out);
  return out;
}

}  // namespace
}  // namespace drainage

// The forward alone, below autograd, for each device the node serves (the kernels it calls are
// registered by the CPU and CUDA libraries; a fake kernel by drainage_fast/backends/native.py).
TORCH_LIBRARY_IMPL(drainage_fast, CPU, m) { m.impl("reduced_loss", &drainage::reduced_loss_forward); }

TORCH_LIBRARY_IMPL(drainage_fast, CUDA, m) { m.impl("reduced_loss", &drainage::reduced_loss_forward); }

TORCH_LIBRARY_IMPL(drainage_fast, Autograd, m) { m.impl("reduced_loss", &drainage::reduced_loss_autograd); }
