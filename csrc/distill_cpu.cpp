// CPU kernels of the fused distillation rows (docs/DESIGN.md).
//
// Rows run in parallel (at::parallel_for; blocks of rows handed out dynamically).
// Each row is walked in chunks of kChunk elements that are converted (fp32/bf16/
// fp16 -> fp32), minus the row's raw max once it is known, and copied into small stack
// buffers; the vectorized loops over those buffers (distill_cpu_chunks.h) multiply by 1/T
// after that subtraction. No [N, V] temporary is allocated except the returned gradient.
//
// Forward, per row (t, s raw; m_* raw maxima; z_* = sum e^((x - m_x) / T)):
//   ids 1, 2: one pass; per chunk the running maxima move to the chunk's max,
//     the sums are rescaled, then z_a, z_b and w += sum e^((x-m_x)/T)((x-m_x)-(y-ref))
//     (x = t for forward KL, s for reverse KL; ref = y at x's argmax: distill_math.h, kl_move).
//   ids 3..7: pass 1 the two (m, z), pass 2 D = sum d_j and c = sum h_j.
//   The divergence reads ids [0, div_vocab) of both rows, CE the student's whole row.
//   CE: (m_1, z_1) at T = 1 from the same chunks (those of s when T == 1 and div_vocab == V).
//   Then the explicit non-finite checks (div_bad; ls_1).
// Backward, per row, one pass:
//   grad = grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y)), the first term
//   over [0, div_vocab) only,
//   every entry below the output dtype's smallest normal stored as 0;
//   rows with grad_div == grad_ce == 0 are zero-filled without reading.
// rows_forward_backward_ (the fused-linear chunk loop, whose coefficients are known up front):
//   both, per block of rows while it is in L2, the gradient written over the student rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "distill_cpu_chunks.h"
#include "distill_math.h"
#include "distill_ops.h"

namespace distillkit::cpu {

// -- rows -------------------------------------------------------------------------
struct Args : RowInputs {
  const float* grad_div;
  const float* grad_ce;
  int64_t gd_stride, gc_stride;
  float* div;
  float* ce;
  float* stats;  // [N, 8]: m_t, ls_a, m_s, ls_b, c, m_1, ls_1, ref (maxima raw: no 1/T rounding in them)
  void* grad;    // [N, V] contiguous, student dtype
  MixParams mp;  // DivParams<DIV>: mp, or ab for alpha-beta (params<DIV>)
  AlphaBetaParams ab;

  template <int DIV>
  const DivParams<DIV>& params() const {
    if constexpr (DIV == kAlphaBeta) return ab;
    else return mp;
  }
};

template <int DIV, typename TS, typename TT>
void forward_rows(const Args& a, int64_t begin, int64_t end) {
  alignas(64) float A[kChunk], B[kChunk], S[kChunk];
  const int64_t V = a.vocab, Vd = a.div_vocab;  // Vd = 0 without a divergence
  const float it = a.inv_t;
  const bool t1 = it == 1.0f;
  // else (m_1, z_1) = (m_b, z_b): the same sums when the divergence covers the whole row at T = 1
  const bool ce_own = a.with_ce && (DIV == kNone || !t1 || Vd != V);
  for (int64_t row = begin; row < end; ++row) {
    const TS* s = static_cast<const TS*>(a.student) + row * a.s_stride;
    const TT* t = DIV != kNone ? static_cast<const TT*>(a.teacher) + row * a.t_stride : nullptr;
    float m_a = kNegInf, z_a = 0.0f, m_b = kNegInf, z_b = 0.0f, w = 0.0f, ref = 0.0f, m_s = kNegInf, z_s = 0.0f;
    for (int64_t start = 0; start < V; start += kChunk) {
      const int64_t n = std::min(kChunk, V - start);
      const int64_t nd = std::min(n, Vd - start), np = padded(nd);  // the chunk's divergence ids: [0, nd)
      if (nd <= 0) {
        // past div_vocab (or no divergence): CE only, below
      } else if constexpr (is_online(DIV)) {
        // x weights the log-ratio (the teacher for forward KL, the student for reverse KL), y is the other
        constexpr bool fwd = DIV == kForwardKL;
        const float ca = load_chunk(t + start, nd, 0.0f, A), cb = load_chunk(s + start, nd, 0.0f, B);
        const float* X = fwd ? A : B;
        const float* Y = fwd ? B : A;
        const float cx = fwd ? ca : cb, cy = fwd ? cb : ca;
        float& m_x = fwd ? m_a : m_b;
        float& z_x = fwd ? z_a : z_b;
        float& m_y = fwd ? m_b : m_a;
        float& z_y = fwd ? z_b : z_a;
        float ref_new = ref;
        if (cx > m_x) {  // the chunk moves the max: ref becomes y there (unless that is -inf)
          const float r = y_at_max(X, Y, nd, cx);
          if (r > kNegInf) ref_new = r;
        }
        const float rx = kl_move(m_x, z_x, w, ref, fmax2(m_x, cx), ref_new, it);
        const float ny = fmax2(m_y, cy), ry = safe_ref(ny);
        z_y *= shift_scale(m_y, ry, it);
        m_y = ny;
        float sums[3];
        kl_sums(X, Y, np, rx, ry, ref, it, sums);
        z_x += sums[0];
        w += sums[1];
        z_y += sums[2];
      } else if constexpr (is_two_pass(DIV)) {
        const float na = fmax2(m_a, load_chunk(t + start, nd, 0.0f, A));
        const float nb = fmax2(m_b, load_chunk(s + start, nd, 0.0f, B));
        const float ra = safe_ref(na), rb = safe_ref(nb);
        z_a *= shift_scale(m_a, ra, it);
        z_b *= shift_scale(m_b, rb, it);
        m_a = na;
        m_b = nb;
        float sums[2];
        sum_exp2(A, B, np, ra, rb, it, sums);
        z_a += sums[0];
        z_b += sums[1];
      } else {
        static_assert(DIV == kNone, "forward_rows: a divergence id that is neither one- nor two-pass");
      }
      if (ce_own) {
        const float ns = fmax2(m_s, load_chunk(s + start, n, 0.0f, S));
        const float rs = safe_ref(ns);
        z_s = z_s * shift_scale(m_s, rs, 1.0f) + sum_exp(S, padded(n), rs, 1.0f);
        m_s = ns;
      }
    }
    float ls_a = 0.0f, ls_b = 0.0f, d = 0.0f, c = 0.0f;
    bool bad = false;
    if constexpr (DIV != kNone) {
      ls_a = finish_ls(z_a);
      ls_b = finish_ls(z_b);
      bad = div_bad(m_a, ls_a, m_b, ls_b);
    }
    float m_1 = 0.0f, ls_1 = 0.0f, ce = 0.0f;
    if (a.with_ce) {  // before ls_b is overwritten below: CE only needs the student
      m_1 = ce_own ? m_s : m_b;
      ls_1 = ce_own ? finish_ls(z_s) : ls_b;
      if (!(finite(m_1) && finite(ls_1))) ls_1 = kNaN;
      const int64_t y = a.labels[row * a.y_stride];
      if (label_valid(y, V, a.ignore_index)) ce = (m_1 - static_cast<float>(s[y])) + ls_1;
    }
    if constexpr (DIV == kForwardKL) {
      d = forward_kl_div(w, z_a, m_b, ref, ls_a, ls_b, it);
      c = -1.0f;
    } else if constexpr (DIV == kReverseKL) {
      c = reverse_kl_c(w, z_b, it);
      d = reverse_kl_div(c, m_a, ref, ls_a, ls_b, it);
    } else if constexpr (is_two_pass(DIV)) {
      if (!bad) {
        // chunk sums added in double: a row of 256-element chunks has hundreds of them
        double sums[2] = {0.0, 0.0};
        const RowStats rs{ls_a, ls_b, 0.0f, it};
        for (int64_t start = 0; start < Vd; start += kChunk) {
          const int64_t n = std::min(kChunk, Vd - start);
          load_chunk(t + start, n, m_a, A);
          load_chunk(s + start, n, m_b, B);
          mix_sums<DIV>(static_cast<const float*>(A), static_cast<const float*>(B), padded(n), rs, a.params<DIV>(),
                        static_cast<double*>(sums));
        }
        d = static_cast<float>(sums[0]);
        c = static_cast<float>(sums[1]);
      }
    }
    if (bad) d = c = ls_a = ls_b = kNaN;
    a.div[row] = d;
    a.ce[row] = ce;
    float* st = a.stats + row * 8;
    st[0] = DIV != kNone ? m_a : 0.0f;
    st[1] = ls_a;
    st[2] = DIV != kNone ? m_b : 0.0f;
    st[3] = ls_b;
    st[4] = c;
    st[5] = m_1;
    st[6] = ls_1;
    st[7] = ref;  // 0 but for the one-pass KLs
  }
}

// IN_PLACE: the gradient overwrites the student rows (rows_forward_backward_), so every chunk goes
// through O after its student chunk was read.
template <int DIV, typename TS, typename TT, bool IN_PLACE = false>
void backward_rows(const Args& a, int64_t begin, int64_t end) {
  alignas(64) float A[kChunk], B[kChunk], O[kChunk];
  const int64_t V = a.vocab;
  const bool t1 = a.inv_t == 1.0f;
  constexpr bool direct = std::is_same_v<TS, float> && !IN_PLACE;
  constexpr float thr = kFlushBelow;
  for (int64_t row = begin; row < end; ++row) {
    TS* g = static_cast<TS*>(a.grad) + row * V;
    float gd, gc;
    int64_t y;
    row_coefficients<DIV>(a, row, gd, gc, y);
    if (gd == 0.0f && gc == 0.0f) {  // masked rows: zeros, nothing read
      std::memset(static_cast<void*>(g), 0, V * sizeof(TS));
      continue;
    }
    const TS* s = static_cast<const TS*>(a.student) + row * a.s_stride;
    const TT* t = DIV != kNone ? static_cast<const TT*>(a.teacher) + row * a.t_stride : nullptr;
    const float* st = a.stats + row * 8;
    // Skip, not multiply by 0: a row weighted out of the divergence may have an infinite one.
    const bool use_div = DIV != kNone && gd != 0.0f;
    // [0, Vd): divergence (+ CE) ids; [Vd, V): CE only
    const int64_t Vd = use_div ? a.div_vocab : 0;
    const RowStats rs{st[1], st[3], st[4], a.inv_t};
    const float m_1 = st[5], ls_1 = st[6];
    const bool ce_fold = use_div && t1 && Vd == V;  // softmax(s) is q: one exp less
    const bool ce_after = gc != 0.0f && !ce_fold;
    const float coef = gd * a.inv_t;
    // The buffers hold t - m_t (t - ref for reverse KL: grad_div_impl) and s - m_s.
    const float shift_a = DIV == kReverseKL ? st[7] : st[0], shift_b = st[2];
    const bool reuse_b = m_1 == shift_b;  // B already holds s - m_1 for the CE term
    // The label's entry is the last one written: - gc, then the flush.
    auto one_hot = [&](float* out, int64_t start, int64_t n) {
      if (y >= start && y < start + n) out[y - start] = flush(out[y - start] - gc, thr);
    };
    if constexpr (DIV != kNone) {
      if (use_div && st[4] != st[4]) {  // c is NaN: the row has no divergence, and so no gradient
        std::fill(g, g + Vd, static_cast<TS>(kNaN));
      } else {
        for (int64_t start = 0; start < Vd; start += kChunk) {
          const int64_t n = std::min(kChunk, Vd - start);
          // fp32 gradients are written in place; the others go through O and one conversion.
          float* out = direct ? reinterpret_cast<float*>(g + start) : static_cast<float*>(O);
          const int64_t cnt = direct ? n : padded(n);
          // Whichever loop writes an entry last flushes it.
          load_chunk(t + start, n, shift_a, A);
          load_chunk(s + start, n, shift_b, B);
          grad_div<DIV>(static_cast<const float*>(A), static_cast<const float*>(B), cnt, rs, coef,
                        ce_fold ? gc : 0.0f, ce_after ? 0.0f : thr, a.params<DIV>(), out);
          if (ce_after) {
            if (!reuse_b) load_chunk(s + start, n, m_1, B);
            grad_ce(static_cast<const float*>(B), cnt, ls_1, gc, true, thr, out);
          }
          one_hot(out, start, n);
          if (!direct) store_chunk(out, n, g + start);
        }
      }
    }
    if (gc == 0.0f) {  // past div_vocab with no CE
      std::memset(static_cast<void*>(g + Vd), 0, (V - Vd) * sizeof(TS));
    } else {
      for (int64_t start = Vd; start < V; start += kChunk) {
        const int64_t n = std::min(kChunk, V - start);
        float* out = direct ? reinterpret_cast<float*>(g + start) : static_cast<float*>(O);
        load_chunk(s + start, n, m_1, A);
        grad_ce(A, direct ? n : padded(n), ls_1, gc, false, thr, out);
        one_hot(out, start, n);
        if (!direct) store_chunk(out, n, g + start);
      }
    }
  }
}

const char* loops_name() { return use_avx512() ? "avx512" : "portable"; }

// -- entry points ---------------------------------------------------------------------
// The gradient is a fresh [N, V] buffer: on Linux its first touch costs one page
// fault and one kernel page clear per 4 KB, which for large buffers takes about as
// long as the kernel itself. So: ask for transparent huge pages on the buffer's
// whole 2 MB blocks (what PyTorch does for every allocation under
// THP_MEM_ALLOC_ENABLE=1), then fault them in with one write per 2 MB block, the
// threads taking contiguous runs of blocks. The rows cannot do that themselves:
// they are handed out in 256 KB blocks, so both threads would fault on the same
// 2 MB page and one would wait while the other's fault clears it. Measured on
// 4096x32000 fp32 (docs/PERFORMANCE.md): the backward takes 94 ms instead of
// 153 ms with 4 KB pages (and ~70 ms into a reused buffer). DISTILLKIT_CPU_THP=0
// turns both off; where THP is disabled, the advice is a no-op and the writes
// touch one 4 KB page in 512.
void prepare_output(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("DISTILLKIT_CPU_THP");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (!enabled || bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end <= begin) return;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return;  // advisory
  const int64_t pages = static_cast<int64_t>((end - begin) / kHuge);
  at::parallel_for(0, pages, 1, [&](int64_t first, int64_t last) {
    for (int64_t page = first; page < last; ++page) {
      *reinterpret_cast<volatile char*>(begin + static_cast<uintptr_t>(page) * kHuge) = 0;
    }
  });
#else
  (void)ptr;
  (void)bytes;
#endif
}

// Rows are handed out in small blocks from a shared counter rather than split evenly up
// front: with the cores shared (other processes, SMT siblings, frequency differences), an
// even split waits for the slowest thread. A block is ~64K elements, so the counter is cheap.
template <typename F>
void parallel_rows(int64_t n, int64_t vocab, const F& body) {
  const int64_t block = std::max<int64_t>(1, 65536 / vocab);
  const int64_t tasks = (n + block - 1) / block;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      body(t * block, std::min(n, (t + 1) * block));
    }
  });
}

// The Args every op starts from: the rows' pointers and strides, and the divergence's constants.
Args make_args(const Rows& r, const at::Tensor& student, const std::optional<at::Tensor>& teacher,
               const std::optional<at::Tensor>& labels, int64_t divergence, double param_a, double param_b,
               double temperature, int64_t ignore_index, bool with_ce) {
  Args a{make_row_inputs(r, student, teacher, labels, temperature, ignore_index, with_ce)};
  a.mp = make_mix(static_cast<int>(divergence), static_cast<float>(param_a));
  if (divergence == kAlphaBeta) a.ab = make_alpha_beta(param_a, param_b);
  return a;
}

// The backward's per-row coefficients of the divergence and CE terms (strided [N] fp32).
void set_grad_coefficients(Args& a, const at::Tensor& grad_div, const at::Tensor& grad_ce) {
  a.grad_div = grad_div.data_ptr<float>();
  a.grad_ce = grad_ce.data_ptr<float>();
  a.gd_stride = grad_div.stride(0);
  a.gc_stride = grad_ce.stride(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_forward_cpu(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
    int64_t divergence, double param_a, double param_b, double temperature, int64_t ignore_index, bool with_ce,
    int64_t div_vocab) {
  const Rows r = check_rows_forward(student, teacher, labels, divergence, param_a, param_b, temperature, with_ce,
                                    div_vocab, at::kCPU);
  const auto opts = student.options().dtype(at::kFloat);
  at::Tensor div = at::empty({r.n}, opts), ce = at::empty({r.n}, opts), stats = at::empty({r.n, 8}, opts);
  Args a = make_args(r, student, teacher, labels, divergence, param_a, param_b, temperature, ignore_index, with_ce);
  a.div = div.data_ptr<float>();
  a.ce = ce.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  const auto tt = r.read_teacher ? teacher->scalar_type() : student.scalar_type();
  dispatch<c10::BFloat16, c10::Half>(divergence, student.scalar_type(), tt, [&](auto d, auto s_tag, auto t_tag) {
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    parallel_rows(r.n, r.vocab, [&](int64_t b, int64_t e) { forward_rows<decltype(d)::value, TS, TT>(a, b, e); });
  });
  return {div, ce, stats};
}

at::Tensor rows_backward_cpu(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                             const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
                             const at::Tensor& stats, int64_t divergence, double param_a, double param_b,
                             double temperature, int64_t ignore_index, bool with_ce, int64_t div_vocab) {
  const Rows r = check_rows_backward(grad_div, grad_ce, student, teacher, labels, stats, divergence, param_a,
                                     param_b, temperature, with_ce, div_vocab, at::kCPU);
  at::Tensor grad = at::empty({r.n, r.vocab}, student.options());
  prepare_output(grad.data_ptr(), grad.nbytes());
  Args a = make_args(r, student, teacher, labels, divergence, param_a, param_b, temperature, ignore_index, with_ce);
  set_grad_coefficients(a, grad_div, grad_ce);
  a.stats = const_cast<float*>(stats.data_ptr<float>());
  a.grad = grad.data_ptr();
  const auto tt = r.read_teacher ? teacher->scalar_type() : student.scalar_type();
  dispatch<c10::BFloat16, c10::Half>(divergence, student.scalar_type(), tt, [&](auto d, auto s_tag, auto t_tag) {
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    parallel_rows(r.n, r.vocab, [&](int64_t b, int64_t e) { backward_rows<decltype(d)::value, TS, TT>(a, b, e); });
  });
  return grad;
}

// Forward and backward of each block of rows back to back, the gradient written over the student
// rows: for callers that know grad_div and grad_ce before the forward (the fused-linear chunk
// loop, distillkit/core/fused_linear.py). A block (parallel_rows: ~64K elements) is still in L2
// when its backward reads it, and the gradient needs no fresh buffer to page in: the rows cross
// memory once instead of three times. The same row functions as the two ops, so the same values.
std::tuple<at::Tensor, at::Tensor> rows_forward_backward_cpu(
    const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
    const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels, int64_t divergence,
    double param_a, double param_b, double temperature, int64_t ignore_index, bool with_ce, int64_t div_vocab) {
  const Rows r = check_rows_forward(student, teacher, labels, divergence, param_a, param_b, temperature, with_ce,
                                    div_vocab, at::kCPU);
  const auto opts = student.options().dtype(at::kFloat);
  at::Tensor div = at::empty({r.n}, opts), ce = at::empty({r.n}, opts), stats = at::empty({r.n, 8}, opts);
  check_rows_backward(grad_div, grad_ce, student, teacher, labels, stats, divergence, param_a, param_b, temperature,
                      with_ce, div_vocab, at::kCPU);
  TORCH_CHECK(r.n <= 1 || r.s_stride == r.vocab, "student must be contiguous (it receives the gradient); got strides ",
              student.strides());
  Args a = make_args(r, student, teacher, labels, divergence, param_a, param_b, temperature, ignore_index, with_ce);
  set_grad_coefficients(a, grad_div, grad_ce);
  a.div = div.data_ptr<float>();
  a.ce = ce.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.grad = student.data_ptr();
  const auto tt = r.read_teacher ? teacher->scalar_type() : student.scalar_type();
  dispatch<c10::BFloat16, c10::Half>(divergence, student.scalar_type(), tt, [&](auto d, auto s_tag, auto t_tag) {
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    parallel_rows(r.n, r.vocab, [&](int64_t b, int64_t e) {
      forward_rows<decltype(d)::value, TS, TT>(a, b, e);
      backward_rows<decltype(d)::value, TS, TT, true>(a, b, e);
    });
  });
  return {div, ce};
}

}  // namespace distillkit::cpu

TORCH_LIBRARY_IMPL(distillkit_ext, CPU, m) {
  m.impl("rows_forward", &distillkit::cpu::rows_forward_cpu);
  m.impl("rows_backward", &distillkit::cpu::rows_backward_cpu);
  m.impl("rows_forward_backward_", &distillkit::cpu::rows_forward_backward_cpu);
}
