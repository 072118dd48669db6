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
  int64_t vocab = 0;           // V: the student's ids (CE)
  int64_t div_vocab = 0;       // the divergence's ids [0, div_vocab) of both rows; 0 when not read
  int64_t s_stride = 0;        // student row stride (elements)
  int64_t t_stride = 0;        // teacher row stride (elements); 0 when not read
  int64_t y_stride = 0;        // labels stride; 0 when not read
  bool read_teacher = false;   // divergence != 0
};

// What every row kernel reads, from the checked arguments: the CPU kernel's Args and the CUDA
// kernels' parameter structs (passed by value) extend it with their outputs.
struct RowInputs {
  const void* student;
  const void* teacher;     // nullptr when not read
  const int64_t* labels;   // nullptr without CE
  int64_t vocab, div_vocab, s_stride, t_stride, y_stride, ignore_index;
  float inv_t;
  bool with_ce;  // the divergence's parameters travel apart: DivParams<DIV>
};

inline RowInputs make_row_inputs(const Rows& r, const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                 const std::optional<at::Tensor>& labels, double temperature,
                                 int64_t ignore_index, bool with_ce) {
  return RowInputs{student.data_ptr(),
                   r.read_teacher ? teacher->data_ptr() : nullptr,
                   with_ce ? labels->data_ptr<int64_t>() : nullptr,
                   r.vocab, r.div_vocab, r.s_stride, r.t_stride, r.y_stride, ignore_index,
                   static_cast<float>(1.0 / temperature),
                   with_ce};
}

// (grad_div, grad_ce, label) of one backward row, for the CPU Args and the CUDA BwdParams alike. ce is
// the constant 0 on an ignored or out-of-range label: no CE gradient there whatever grad_ce says, and
// y = -1 (no one-hot).
template <int DIV, typename P>
DK_HD void row_coefficients(const P& p, int64_t row, float& gd, float& gc, int64_t& y) {
  gd = DIV != kNone ? p.grad_div[row * p.gd_stride] : 0.0f;
  gc = 0.0f;
  y = -1;
  if (p.with_ce) {
    const int64_t label = p.labels[row * p.y_stride];
    if (label_valid(label, p.vocab, p.ignore_index)) {
      gc = p.grad_ce[row * p.gc_stride];
      y = label;
    }
  }
}

// TORCH_CHECKs naming the offending argument; `device` is the backend's device type.
Rows check_rows_forward(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                        const std::optional<at::Tensor>& labels, int64_t divergence, double param_a,
                        double param_b, double temperature, bool with_ce, int64_t div_vocab,
                        c10::DeviceType device);

Rows check_rows_backward(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                         const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
                         const at::Tensor& stats, int64_t divergence, double param_a, double param_b,
                         double temperature, bool with_ce, int64_t div_vocab, c10::DeviceType device);

namespace cpu {
// Which loops the CPU kernel runs: "avx512" (hand-written) or "portable" (compiler-vectorized).
const char* loops_name();
}  // namespace cpu

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
        case kTVD: return f(std::integral_constant<int, kTVD>{}, s_tag, t_tag);
        case kAlphaBeta: return f(std::integral_constant<int, kAlphaBeta>{}, s_tag, t_tag);
        default:  // checked by the ops already; an id added to the enum but not here lands here
          TORCH_CHECK(false, "divergence must be an id in [0, ", kMaxDivergenceId,
                      "] (distillkit/core/divergences.py); got ", div);
      }
    });
  });
}

}  // namespace distillkit
