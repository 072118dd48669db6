// The two native ops of the fused distillation rows (schema + argument checks).
// Implementations: distill_cpu.cpp (CPU) and distill_cuda.cu (CUDA); the fake
// (meta) implementations live in distillkit/core/_ext.py.
//
// Layout follows pytorch/extension-cpp: the ops are registered by static
// initializers when `distillkit._C` is imported; the module itself is an empty
// Python module built against the limited C API.
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "distill_ops.h"

namespace distillkit {
namespace {

bool is_logits_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

std::string device_name(c10::DeviceType device) { return c10::DeviceTypeName(device, /*lower_case=*/true); }

// [N, V] rows with a contiguous last dim and any row stride (0 included: a broadcast row).
void check_logits(const at::Tensor& x, const char* name, c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, name, " must be a ", device_name(device), " tensor; got ", x.device());
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [rows, vocab]; got shape ", x.sizes());
  TORCH_CHECK(is_logits_dtype(x.scalar_type()), name, " must be float32, bfloat16 or float16; got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, " must have a contiguous last dim; got strides ",
              x.strides());
}

void check_rows_vector(const at::Tensor& x, const char* name, int64_t n, c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, name, " must be a ", device_name(device), " tensor; got ", x.device());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, name, " must have shape [", n, "]; got ", x.sizes());
}

bool is_mixture(int64_t div) { return div == kJSD || div == kSkewForwardKL || div == kSkewReverseKL; }

Rows check_common(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                  const std::optional<at::Tensor>& labels, int64_t divergence, double param_a, double param_b,
                  double temperature, bool with_ce, int64_t div_vocab, c10::DeviceType device) {
  check_logits(student, "student", device);
  Rows r;
  r.n = student.size(0);
  r.vocab = student.size(1);
  r.s_stride = student.stride(0);
  TORCH_CHECK(r.vocab > 0, "student must have a non-empty vocab dim; got shape ", student.sizes());
  TORCH_CHECK(divergence >= 0 && divergence <= kMaxDivergenceId, "divergence must be an id in [0, ",
              kMaxDivergenceId, "] (distillkit/core/divergences.py); got ", divergence);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0; got ",
              temperature);
  TORCH_CHECK(std::isfinite(param_a) && std::isfinite(param_b), "param_a and param_b must be finite; got (",
              param_a, ", ", param_b, ")");
  if (is_mixture(divergence)) {
    TORCH_CHECK(param_a >= 0.0 && param_a <= 1.0, "param_a (beta or skew) must lie in [0, 1]; got ", param_a);
  } else if (divergence == kAlphaBeta) {
    TORCH_CHECK(param_a >= 0.0 && param_b >= 0.0 && param_a + param_b > 0.0,
                "param_a (alpha) and param_b (beta) must be >= 0 and not both 0; got (", param_a, ", ", param_b,
                ")");
  }
  if (divergence != 0) {
    TORCH_CHECK(div_vocab >= 1 && div_vocab <= r.vocab, "div_vocab must lie in [1, ", r.vocab,
                "] (the student's vocab) when divergence != 0; got ", div_vocab);
    TORCH_CHECK(teacher.has_value() && teacher->defined(), "teacher must be given when divergence != 0");
    check_logits(*teacher, "teacher", device);
    TORCH_CHECK(teacher->size(0) == r.n && teacher->size(1) >= div_vocab, "teacher must have shape [", r.n,
                ", >= div_vocab = ", div_vocab, "]; got ", teacher->sizes());
    TORCH_CHECK(teacher->device() == student.device(), "teacher must be on the student's device ",
                student.device(), "; got ", teacher->device());
    r.t_stride = teacher->stride(0);
    r.div_vocab = div_vocab;
    r.read_teacher = true;
  }
  if (with_ce) {
    TORCH_CHECK(labels.has_value() && labels->defined(), "labels must be given when with_ce is true");
    check_rows_vector(*labels, "labels", r.n, device);
    TORCH_CHECK(labels->scalar_type() == at::kLong, "labels must be int64; got ", labels->scalar_type());
    TORCH_CHECK(labels->device() == student.device(), "labels must be on the student's device");
    r.y_stride = labels->stride(0);
  }
  return r;
}

}  // namespace

Rows check_rows_forward(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                        const std::optional<at::Tensor>& labels, int64_t divergence, double param_a,
                        double param_b, double temperature, bool with_ce, int64_t div_vocab,
                        c10::DeviceType device) {
  return check_common(student, teacher, labels, divergence, param_a, param_b, temperature, with_ce, div_vocab,
                      device);
}

Rows check_rows_backward(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                         const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
                         const at::Tensor& stats, int64_t divergence, double param_a, double param_b,
                         double temperature, bool with_ce, int64_t div_vocab, c10::DeviceType device) {
  Rows r = check_common(student, teacher, labels, divergence, param_a, param_b, temperature, with_ce, div_vocab,
                        device);
  auto check_grad = [&](const at::Tensor& g, const char* name) {
    check_rows_vector(g, name, r.n, device);
    TORCH_CHECK(g.scalar_type() == at::kFloat, name, " must be float32; got ", g.scalar_type());
    TORCH_CHECK(g.device() == student.device(), name, " must be on the student's device");
  };
  check_grad(grad_div, "grad_div");
  check_grad(grad_ce, "grad_ce");
  TORCH_CHECK(stats.device().type() == device, "stats must be a ", device_name(device), " tensor");
  TORCH_CHECK(stats.device() == student.device(), "stats must be on the student's device");
  TORCH_CHECK(stats.scalar_type() == at::kFloat, "stats must be float32; got ", stats.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == r.n && stats.size(1) == 8, "stats must have shape [", r.n,
              ", 8]; got ", stats.sizes());
  TORCH_CHECK(stats.is_contiguous(), "stats must be contiguous");
  return r;
}

}  // namespace distillkit

TORCH_LIBRARY(distillkit_ext, m) {
  m.def(
      "rows_forward(Tensor student, Tensor? teacher, Tensor? labels, int divergence, float param_a, "
      "float param_b, float temperature, int ignore_index, bool with_ce, int div_vocab) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rows_backward(Tensor grad_div, Tensor grad_ce, Tensor student, Tensor? teacher, Tensor? labels, "
      "Tensor stats, int divergence, float param_a, float param_b, float temperature, int ignore_index, "
      "bool with_ce, int div_vocab) -> Tensor");
  // CPU only: both of the above on each block of rows, the gradient written over the student rows (the
  // fused-linear chunk loop, which knows grad_div and grad_ce up front: distillkit/core/backends/cpu_fused.py).
  m.def(
      "rows_forward_backward_(Tensor grad_div, Tensor grad_ce, Tensor(a!) student, Tensor? teacher, "
      "Tensor? labels, int divergence, float param_a, float param_b, float temperature, int ignore_index, "
      "bool with_ce, int div_vocab) -> (Tensor, Tensor)");
}

// `import distillkit._C` needs a module init function; the ops above are the payload. The one
// Python function says which CPU loops run (for `distillkit env`).
namespace {
PyObject* cpu_loops(PyObject*, PyObject*) { return PyUnicode_FromString(distillkit::cpu::loops_name()); }

PyMethodDef module_methods[] = {
    {"cpu_loops", cpu_loops, METH_NOARGS, "'avx512' or 'portable': the CPU kernel's exp-bound loops."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
