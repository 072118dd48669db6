// Argument checks, shared declarations and the dtype/divergence dispatch of the two native ops
// (registered in ops.cpp; implemented in distill_cpu.cpp and distill_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "distill_math.h"

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

// -- compile-time dispatch, shared by both backends ------------------------------------
template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<element type>) for fp32 / bf16 / fp16 logits; the backend names its 16-bit types
// (c10::BFloat16 and c10::Half on the host, __nv_bfloat16 and __half on the device).
template <typename BF16, typename F16, typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(Tag<float>{});
    case at::kBFloat16: return f(Tag<BF16>{});
    case at::kHalf: return f(Tag<F16>{});
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

// f(integral_constant<DIV>, Tag<TS>, Tag<TT>); TT = TS when the teacher is not read.
template <typename BF16, typename F16, typename F>
void dispatch(int64_t div, at::ScalarType ts, at::ScalarType tt, F&& f) {
  dispatch_dtype<BF16, F16>(ts, [&](auto s_tag) {
    if (div == kNone) return f(std::integral_constant<int, kNone>{}, s_tag, s_tag);
    dispatch_dtype<BF16, F16>(tt, [&](auto t_tag) {
      switch (div) {
        case kForwardKL: return f(std::integral_constant<int, kForwardKL>{}, s_tag, t_tag);
        case kReverseKL: return f(std::integral_constant<int, kReverseKL>{}, s_tag, t_tag);
        case kJSD: return f(std::integral_constant<int, kJSD>{}, s_tag, t_tag);
        case kSkewForwardKL: return f(std::integral_constant<int, kSkewForwardKL>{}, s_tag, t_tag);
        case kSkewReverseKL: return f(std::integral_constant<int, kSkewReverseKL>{}, s_tag, t_tag);
        default: return f(std::integral_constant<int, kTVD>{}, s_tag, t_tag);
      }
    });
  });
}

}  // namespace distillkit
