// Argument checks and shared declarations of the two native ops
// (registered in ops.cpp; implemented in distill_cpu.cpp and distill_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <tuple>

namespace distillkit {

// Row geometry resolved from the checked arguments.
struct Rows {
  int64_t n = 0;               // rows
  int64_t vocab = 0;           // V
  int64_t s_stride = 0;        // student row stride (elements)
  int64_t t_stride = 0;        // teacher row stride (elements); 0 when not read
  int64_t y_stride = 0;        // labels stride; 0 when not read
  bool read_teacher = false;   // divergence != 0
};

// TORCH_CHECKs naming the offending argument; `device` is the backend's device type.
Rows check_rows_forward(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                        const std::optional<at::Tensor>& labels, int64_t divergence, double mix,
                        double temperature, bool with_ce, c10::DeviceType device);

Rows check_rows_backward(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                         const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
                         const at::Tensor& stats, int64_t divergence, double mix, double temperature,
                         bool with_ce, c10::DeviceType device);

}  // namespace distillkit
