// The two native ops of the fused distillation rows (schema + argument checks).
// Implementations: distill_cpu.cpp (CPU) and distill_cuda.cu (CUDA); the fake
// (meta) implementations live in distillkit/_ext.py.
//
// Layout follows pytorch/extension-cpp: the ops are registered by static
// initializers when `distillkit._C` is imported; the module itself is an empty
// Python module built against the limited C API.
#include <Python.h>
#include <ATen/MemoryOverlap.h>
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

Rows check_common(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                  const std::optional<at::Tensor>& labels, int64_t divergence, double mix, double temperature,
                  bool with_ce, c10::DeviceType device) {
  check_logits(student, "student", device);
  Rows r;
  r.n = student.size(0);
  r.vocab = student.size(1);
  r.s_stride = student.stride(0);
  TORCH_CHECK(r.vocab > 0, "student must have a non-empty vocab dim; got shape ", student.sizes());
  TORCH_CHECK(divergence >= 0 && divergence <= 6, "divergence must be an id in [0, 6]; got ", divergence);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0; got ",
              temperature);
  TORCH_CHECK(mix >= 0.0 && mix <= 1.0, "mix must lie in [0, 1]; got ", mix);
  if (divergence != 0) {
    TORCH_CHECK(teacher.has_value() && teacher->defined(), "teacher must be given when divergence != 0");
    check_logits(*teacher, "teacher", device);
    TORCH_CHECK(teacher->sizes() == student.sizes(), "teacher must have the student's shape ", student.sizes(),
                "; got ", teacher->sizes());
    TORCH_CHECK(teacher->device() == student.device(), "teacher must be on the student's device ",
                student.device(), "; got ", teacher->device());
    r.t_stride = teacher->stride(0);
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
                        const std::optional<at::Tensor>& labels, int64_t divergence, double mix,
                        double temperature, bool with_ce, c10::DeviceType device) {
  return check_common(student, teacher, labels, divergence, mix, temperature, with_ce, device);
}

Rows check_rows_backward(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                         const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
                         const at::Tensor& stats, int64_t divergence, double mix, double temperature,
                         bool with_ce, c10::DeviceType device) {
  Rows r = check_common(student, teacher, labels, divergence, mix, temperature, with_ce, device);
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

// Conservative: where ATen cannot tell (a strided view), sharing storage counts as overlap.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial ||
         (status == at::MemOverlapStatus::TooHard && a.storage().is_alias_of(b.storage()));
}

Rows check_rows_backward_into(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                              const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
                              const at::Tensor& stats, int64_t divergence, double mix, double temperature,
                              bool with_ce, const at::Tensor& out, c10::DeviceType device) {
  const Rows r = check_rows_backward(grad_div, grad_ce, student, teacher, labels, stats, divergence, mix,
                                     temperature, with_ce, device);
  TORCH_CHECK(out.device() == student.device(), "out must be on the student's device ", student.device(), "; got ",
              out.device());
  TORCH_CHECK(out.scalar_type() == student.scalar_type(), "out must have the student's dtype ",
              student.scalar_type(), "; got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == r.n && out.size(1) == r.vocab, "out must have shape [", r.n, ", ",
              r.vocab, "]; got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous; got strides ", out.strides());
  // the rows re-read the logits after writing a chunk of the gradient
  TORCH_CHECK(!may_overlap(out, student), "out must not overlap the student");
  TORCH_CHECK(!r.read_teacher || !may_overlap(out, *teacher), "out must not overlap the teacher");
  return r;
}

}  // namespace distillkit

TORCH_LIBRARY(distillkit_ext, m) {
  m.def(
      "rows_forward(Tensor student, Tensor? teacher, Tensor? labels, int divergence, float mix, "
      "float temperature, int ignore_index, bool with_ce) -> (Tensor div, Tensor ce, Tensor stats)");
  m.def(
      "rows_backward(Tensor grad_div, Tensor grad_ce, Tensor student, Tensor? teacher, Tensor? labels, "
      "Tensor stats, int divergence, float mix, float temperature, int ignore_index, bool with_ce) -> Tensor");
  // The same into a caller's [N, V] buffer: a reused buffer skips the page faults of a fresh one.
  // Returns nothing: torch.compile functionalizes custom ops that mutate, but not ones whose
  // output aliases an input.
  m.def(
      "rows_backward_into(Tensor grad_div, Tensor grad_ce, Tensor student, Tensor? teacher, Tensor? labels, "
      "Tensor stats, int divergence, float mix, float temperature, int ignore_index, bool with_ce, "
      "Tensor(a!) out) -> ()");
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
