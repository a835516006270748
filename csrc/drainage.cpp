// Operator schemas of the drainage loss: defined once here; each device registers its kernels in a
// TORCH_LIBRARY_IMPL block beside them (cpu/drainage_cpu.cpp, cuda/drainage_cuda.cu). The fake
// (meta) kernels and the autograd formula live in Python, drainage_fast/backends/native.py.
//
// Contract (the same as the Triton backend, drainage_fast/backends/__init__.py):
//   x3: (N, S, K) logits, any strides; row r = n * S + s. target: (R,) int32 / int64, any stride.
//   member: the loss (drainage_fast/_members.py Member; row_math.h), h1 and h2 its hyper-parameters
//     (Drainage: log alpha, log beta). weight: None (every row weighs 1) or (R,) sample weights, any
//     float dtype and stride, without grad: the row ops give the weighted loss w_r l_r and its terms.
//   forward -> loss (R,) and stats (4, R) = [shift, c, g_t, g_d], float32 (float64 for float64
//     logits); see row_math.h.
//   backward -> the gradient of sum_r grad_rows[r] * loss[r], shaped and typed like x3.
//   forward_with_grad -> loss, stats and the gradient of the summed loss times scale (a one-element
//     tensor of the loss dtype: 1 / count for a mean; none: 1) in one pass over the logits.
//   forward_grad_ -> loss (R,), and x3 overwritten with the gradient of the summed (weighted) loss:
//     the fused linear path's chunk of logits becomes its gradient with no second buffer
//     (drainage_fast/linear.py). Each row (CPU: each group of rows) is read whole before it is
//     written. No row terms are kept.
//   scale_ multiplies a gradient by a one-element tensor in place; nothing happens when it is 1.
//   forward_reduced (the contract's mean / sum path) -> out (0-dim loss dtype: the sum of the
//     (weighted) row losses, or their mean over the kept rows, nan when none is kept: divided by the
//     count, or by the kept rows' weight sum), inv_count ((1,), 1 / that divisor, only when mean)
//     and, when with_grad, a gradient like empty_like(x3); no row terms written.
//     CPU: the targets (IndexError) and weights (finite, >= 0: ValueError) are checked and the
//     divisor made first, so the gradient is that of out (1 / divisor applied). CUDA: checked on the
//     device (device-side asserts, no host sync), and the gradient is that of the SUM (1 / divisor is
//     left to scale_by_, notes in cuda/drainage_cuda.cu).
//   reduced_loss: the eager mean / sum loss of the user's (N, K, d1..dk) logits and (N, d1..dk)
//     targets (and weights), with its own C++ autograd node over forward_reduced and scale_by_
//     (reduced_loss.cpp).
//   scale_by_: grad *= grad_out * pending (pending None: 1), the factor in the loss dtype; nothing
//     happens when it is exactly 1 (CUDA: one launch that returns at once on the device).
#include <Python.h>
#include <torch/library.h>

// Importing the ahead-of-time module drainage_fast._C runs the static registrations below; the
// module itself has no Python functions (the ops are reached through torch.ops.drainage_fast).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(drainage_fast, m) {
  // torch.compile looks for the fake kernels in this module and imports it when needed.
  m.set_python_module("drainage_fast.backends.native");
  m.def(
      "forward(Tensor x3, Tensor target, float h1, float h2, int drainage_idx, int ignore_index, int member, "
      "Tensor? weight) -> (Tensor loss, Tensor stats)");
  m.def(
      "backward(Tensor x3, Tensor target, Tensor stats, Tensor grad_rows, int drainage_idx, "
      "int ignore_index) -> Tensor");
  m.def(
      "forward_with_grad(Tensor x3, Tensor target, Tensor? scale, float h1, float h2, int drainage_idx, "
      "int ignore_index, int member, Tensor? weight) -> (Tensor loss, Tensor stats, Tensor grad)");
  m.def(
      "forward_grad_(Tensor(a!) x3, Tensor target, float h1, float h2, int drainage_idx, int ignore_index, "
      "int member, Tensor? weight) -> Tensor loss");
  m.def("scale_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def(
      "forward_reduced(Tensor x3, Tensor target, bool mean, bool with_grad, float h1, float h2, int drainage_idx, "
      "int ignore_index, int member, Tensor? weight) -> (Tensor out, Tensor? inv_count, Tensor? grad)");
  m.def("scale_by_(Tensor(a!) grad, Tensor grad_out, Tensor? pending) -> ()");
  m.def(
      "reduced_loss(Tensor logits, Tensor target, bool mean, float h1, float h2, int drainage_idx, "
      "int ignore_index, int member, Tensor? weight) -> Tensor");
}
