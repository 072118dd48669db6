// CUDA kernels of the fused distillation rows (docs/DESIGN.md).
//
// One block per row in the forward; each thread walks "groups" of 8 elements
// (one 16-byte load for bf16/fp16, two for fp32), fp32 math, warp-shuffle +
// shared-memory block reductions. Groups are aligned to the student row: group
// g covers elements [8g - shift, 8g - shift + 8) where shift puts the student's
// 16-byte boundaries on group starts, so any row stride works; the teacher and
// the gradient use vector accesses when their rows share that alignment (same
// dtype, same stride) and masked scalar ones otherwise. Only the (at most) two
// partial groups of a row take the masked path.
//
// Paths:
//   forward_stream: any V. Ids 0-2 read s and t once (online softmax: running max
//     per thread, sums rescaled when it grows, merged across the block at the end).
//     Ids 3-7 read them twice (normalizers, then D and c).
//   forward_smem: ids 3-7 when a row of s and t fits in shared memory: pass 1
//     keeps the row there, pass 2 reads it back; each input element is read once.
//   The divergence covers ids [0, div_vocab) of both rows (the teacher is read no
//   further), CE the student's whole row.
//   backward: grid (rows, parts of a row); reads s, t once and writes grad once;
//     rows with grad_div == grad_ce == 0 are zero-filled without reading.
// Everything is launched on the current stream; nothing synchronizes the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "distill_cuda_common.cuh"
#include "distill_math.h"
#include "distill_ops.h"

namespace distillkit::cuda {

struct FwdParams : RowInputs {
  float* div;
  float* ce;
  float* stats;
};

// Pass-1 state of one thread, merged over the block by finish_pass1: raw maxima m and
// z = sum e^((x - m) / T) (T = 1 for the CE's m_s, z_s); (w, ref) of the one-pass KLs.
struct Pass1 {
  float m_a = kNegInf, z_a = 0.0f, m_b = kNegInf, z_b = 0.0f, w = 0.0f, ref = 0.0f, m_s = kNegInf, z_s = 0.0f;
};

template <int DIV>
__device__ __forceinline__ void pass1_group(Pass1& st, const float (&sv)[kVec], const float (&tv)[kVec],
                                            float inv_t, bool ce_own) {
  if constexpr (DIV == kForwardKL) {  // the teacher weights the log-ratio
    kl_group(tv, sv, inv_t, st.m_a, st.z_a, st.w, st.ref);
    lse_group(sv, inv_t, st.m_b, st.z_b);
  } else if constexpr (DIV == kReverseKL) {  // the student does
    kl_group(sv, tv, inv_t, st.m_b, st.z_b, st.w, st.ref);
    lse_group(tv, inv_t, st.m_a, st.z_a);
  } else if constexpr (is_two_pass(DIV)) {
    lse_group(tv, inv_t, st.m_a, st.z_a);
    lse_group(sv, inv_t, st.m_b, st.z_b);
  } else {
    static_assert(DIV == kNone, "pass1_group: a divergence id that is neither one- nor two-pass");
  }
  if (ce_own) lse_group(sv, 1.0f, st.m_s, st.z_s);
}

// A row's results: stats slots (raw maxima, log-sums, ref), D and c.
struct RowOut {
  float m_a, ls_a, m_b, ls_b, m_1, ls_1, ref, d, c;
};

// Block merge of pass 1: the maxima and log-sums and, for ids 1-2, D and c. Every thread gets them.
// The one-pass KL states merge into the ref of a thread holding the max (the largest such ref).
template <int DIV>
__device__ __forceinline__ RowOut finish_pass1(Pass1 st, float* smem, float inv_t) {
  float mx[3] = {st.m_a, st.m_b, st.m_s};
  block_allreduce(mx, smem, MaxOp{});
  float ref = 0.0f;
  if constexpr (is_online(DIV)) {
    constexpr bool fwd = DIV == kForwardKL;
    float& m_x = fwd ? st.m_a : st.m_b;
    float& z_x = fwd ? st.z_a : st.z_b;
    const float m_max = fwd ? mx[0] : mx[1];
    float r[1] = {m_x == m_max ? st.ref : kNegInf};
    block_allreduce(r, smem, MaxOp{});
    ref = r[0];
    kl_move(m_x, z_x, st.w, st.ref, m_max, ref, inv_t);  // m_x = m_max now: its scale below is 1
  }
  const float sa = shift_scale(st.m_a, safe_ref(mx[0]), inv_t), sb = shift_scale(st.m_b, safe_ref(mx[1]), inv_t);
  float sums[4] = {st.z_a * sa, st.z_b * sb, st.w, st.z_s * shift_scale(st.m_s, safe_ref(mx[2]), 1.0f)};
  block_allreduce(sums, smem, SumOp{});
  RowOut r{mx[0], finish_ls(sums[0]), mx[1], finish_ls(sums[1]), mx[2], finish_ls(sums[3]), ref, 0.0f, 0.0f};
  if constexpr (DIV == kForwardKL) {
    r.d = forward_kl_div(sums[2], sums[0], r.m_b, ref, r.ls_a, r.ls_b, inv_t);
    r.c = -1.0f;
  } else if constexpr (DIV == kReverseKL) {
    r.c = reverse_kl_c(sums[2], sums[1], inv_t);
    r.d = reverse_kl_div(r.c, r.m_a, ref, r.ls_a, r.ls_b, inv_t);
  } else {  // D and c come from pass 2
    static_assert(DIV == kNone || is_two_pass(DIV), "finish_pass1: a divergence id that is neither one- nor two-pass");
  }
  return r;
}

// Pass-2 terms of one group of the two-pass divergences: acc += (sum d_j, sum h_j).
template <int DIV, int FORM>
__device__ __forceinline__ void pass2_group(const float (&sv)[kVec], const float (&tv)[kVec], float inv_t,
                                            const RowOut& r, const DivParams<DIV>& dp, float (&acc)[2]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float lp = (tv[i] - r.m_a) * inv_t - r.ls_a, lq = (sv[i] - r.m_b) * inv_t - r.ls_b;
    float d, h;
    div_terms<DIV, FORM>(lp, lq, fexp(lp), fexp(lq), dp, d, h);
    acc[0] += d;
    acc[1] += h;
  }
}

// The stats row is [m_t, ls_a, m_s, ls_b, c, m_1, ls_1, ref], written in two parts by thread 0.
// CE part: ce and slots 5-6, right after pass 1, so that (m_1, ls_1) are not live across pass 2
// (its division's slow-path call would spill them). ls_1 is NaN when the student row has no
// finite softmax (NaN, +inf, nothing finite).
template <typename TS>
__device__ __forceinline__ void write_ce(const FwdParams& p, int64_t row, const TS* s, float m_1, float ls_1) {
  float ce = 0.0f;
  if (p.with_ce) {
    if (!(finite(m_1) && finite(ls_1))) ls_1 = kNaN;
    const int64_t y = p.labels[row * p.y_stride];
    if (label_valid(y, p.vocab, p.ignore_index)) ce = (m_1 - to_float(s[y])) + ls_1;
  } else {
    m_1 = ls_1 = 0.0f;
  }
  p.ce[row] = ce;
  float* st = p.stats + 8 * row;
  st[5] = m_1;
  st[6] = ls_1;
}

// Divergence part: D and slots 0-4 and 7, after the explicit non-finite check (div_bad).
template <int DIV>
__device__ __forceinline__ void write_div(const FwdParams& p, int64_t row, RowOut r) {
  if constexpr (DIV == kNone) {
    r.m_a = r.ls_a = r.m_b = r.ls_b = r.d = r.c = 0.0f;
  } else if (div_bad(r.m_a, r.ls_a, r.m_b, r.ls_b)) {
    r.d = r.c = r.ls_a = r.ls_b = kNaN;
  }
  p.div[row] = r.d;
  float* st = p.stats + 8 * row;
  reinterpret_cast<float4*>(st)[0] = make_float4(r.m_a, r.ls_a, r.m_b, r.ls_b);
  st[4] = r.c;
  st[7] = is_online(DIV) ? r.ref : 0.0f;
}

// Forward, streaming: any V. D and c of the KLs from one pass (kl_move),
// D = sum d_j and c = sum h_j in a second pass for the others. Pass 1 reads the divergence's ids,
// [0, div_vocab), of both rows (CE's sums with them), ce_tail the student's ids past them.
template <int DIV, typename TS, typename TT>
__global__ void __launch_bounds__(kMaxThreads) forward_stream_kernel(const FwdParams p, const DivParams<DIV> dp) {
  __shared__ float smem[4 * 32];
  const int64_t row = blockIdx.x, V = p.vocab;
  const int64_t Vd = DIV != kNone ? p.div_vocab : V;  // CE only: pass 1 reads the whole row
  const TS* s = static_cast<const TS*>(p.student) + row * p.s_stride;
  const TT* t = static_cast<const TT*>(p.teacher) + row * p.t_stride;  // not read when DIV == 0
  const int shift = shift_of(s);
  const int64_t groups = (Vd + shift + kVec - 1) / kVec;
  const bool t_vec = DIV != kNone && group_aligned(t, shift);
  // else (m_1, ls_1) = (m_b, ls_b), the same sums, at T = 1 over the whole row; id 0 always (zeros without CE)
  const bool ce_own = DIV == kNone || (p.with_ce && (p.inv_t != 1.0f || Vd != V));

  Pass1 st;
  if (ce_own && Vd != V) ce_tail(s, Vd, V, shift, st.m_s, st.z_s);
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    const int64_t start = g * kVec - shift;
    float sv[kVec], tv[kVec];
    load_group(s, start, Vd, true, sv);
    if constexpr (DIV != kNone) load_group(t, start, Vd, t_vec, tv);
    pass1_group<DIV>(st, sv, tv, p.inv_t, ce_own);
  }

  RowOut r = finish_pass1<DIV>(st, smem, p.inv_t);
  if (threadIdx.x == 0) write_ce(p, row, s, ce_own ? r.m_1 : r.m_b, ce_own ? r.ls_1 : r.ls_b);
  if constexpr (is_two_pass(DIV)) {
    float acc[2] = {0.0f, 0.0f};
    by_form<DIV>(dp, [&](auto form) {
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
        const int64_t start = g * kVec - shift;
        float sv[kVec], tv[kVec];
        load_group(s, start, Vd, true, sv);
        load_group(t, start, Vd, t_vec, tv);
        pass2_group<DIV, decltype(form)::value>(sv, tv, p.inv_t, r, dp, acc);
      }
    });
    block_allreduce(acc, smem, SumOp{});
    r.d = acc[0];
    r.c = acc[1];
  }
  if (threadIdx.x == 0) write_div<DIV>(p, row, r);
}

// Forward, single pass for the two-pass divergences: pass 1 parks the row's divergence ids (in their
// own dtype) in shared memory, pass 2 reads them from there. Layout: group g at [8g, 8g + 8).
template <int DIV, typename TS, typename TT>
__global__ void __launch_bounds__(kMaxThreads) forward_smem_kernel(const FwdParams p, const DivParams<DIV> dp) {
  static_assert(is_two_pass(DIV), "only the two-pass divergences gain from keeping the row");
  extern __shared__ __align__(16) unsigned char row_smem[];
  __shared__ float smem[4 * 32];
  const int64_t row = blockIdx.x, V = p.vocab, Vd = p.div_vocab;
  const TS* s = static_cast<const TS*>(p.student) + row * p.s_stride;
  const TT* t = static_cast<const TT*>(p.teacher) + row * p.t_stride;
  const int shift = shift_of(s);
  const int64_t groups = (Vd + shift + kVec - 1) / kVec;
  const bool t_vec = group_aligned(t, shift);
  const bool ce_own = p.with_ce && (p.inv_t != 1.0f || Vd != V);
  TS* s_sm = reinterpret_cast<TS*>(row_smem);
  TT* t_sm = reinterpret_cast<TT*>(row_smem + ((groups * kVec * sizeof(TS) + 15) & ~size_t{15}));

  Pass1 st;
  if (ce_own && Vd != V) ce_tail(s, Vd, V, shift, st.m_s, st.z_s);
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    const int64_t start = g * kVec - shift;
    float sv[kVec], tv[kVec];
    load_group(s, start, Vd, true, sv);
    load_group(t, start, Vd, t_vec, tv);
    store_vec8<TS, false>(s_sm + g * kVec, sv);  // exact: the values came from TS / TT
    store_vec8<TT, false>(t_sm + g * kVec, tv);
    pass1_group<DIV>(st, sv, tv, p.inv_t, ce_own);
  }
  RowOut r = finish_pass1<DIV>(st, smem, p.inv_t);  // its barriers also order the row stores
  if (threadIdx.x == 0) write_ce(p, row, s, ce_own ? r.m_1 : r.m_b, ce_own ? r.ls_1 : r.ls_b);
  float acc[2] = {0.0f, 0.0f};
  by_form<DIV>(dp, [&](auto form) {
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      float sv[kVec], tv[kVec];
      load_vec8<TS, false>(s_sm + g * kVec, sv);
      load_vec8<TT, false>(t_sm + g * kVec, tv);
      pass2_group<DIV, decltype(form)::value>(sv, tv, p.inv_t, r, dp, acc);
    }
  });
  block_allreduce(acc, smem, SumOp{});
  r.d = acc[0];
  r.c = acc[1];
  if (threadIdx.x == 0) write_div<DIV>(p, row, r);
}

struct BwdParams : RowInputs {
  const float* grad_div;
  const float* grad_ce;
  int64_t gd_stride, gc_stride;
  const float* stats;
  void* grad;
};

// Backward: grad = grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y)), the first term over
// [0, div_vocab) only, every entry below the output dtype's smallest normal stored as 0;
// grid (rows, parts): block (r, k) writes the k-th range of groups of row r.
template <int DIV, typename TS, typename TT>
__global__ void __launch_bounds__(kBwdThreads) backward_kernel(const BwdParams p, const DivParams<DIV> dp) {
  const int64_t row = blockIdx.x, V = p.vocab;
  const TS* s = static_cast<const TS*>(p.student) + row * p.s_stride;
  const TT* t = static_cast<const TT*>(p.teacher) + row * p.t_stride;
  TS* gr = static_cast<TS*>(p.grad) + row * V;
  const int shift = shift_of(s);
  const int64_t groups = (V + shift + kVec - 1) / kVec;
  const int64_t per_part = (groups + gridDim.y - 1) / gridDim.y;
  const int64_t g_begin = blockIdx.y * per_part, g_end = groups < g_begin + per_part ? groups : g_begin + per_part;
  const bool g_vec = group_aligned(gr, shift);

  float gd, gc;
  int64_t y;
  row_coefficients<DIV>(p, row, gd, gc, y);
  if (gd == 0.0f && gc == 0.0f) {  // masked rows: zeros, nothing read
    const float zeros[kVec] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t g = g_begin + threadIdx.x; g < g_end; g += blockDim.x)
      store_group(gr, g * kVec - shift, V, g_vec, zeros);
    return;
  }
  // m_t, ls_a, m_s, ls_b, c, m_1, ls_1, ref; scalar loads: a stats view need not be 16-byte aligned
  const float* stp = p.stats + row * 8;
  const float c = stp[4];
  // Skip, not multiply by 0: a row weighted out of the divergence may have an infinite one.
  const bool use_div = DIV != kNone && gd != 0.0f;
  const int64_t Vd = use_div ? p.div_vocab : 0;  // [0, Vd): divergence (+ CE) ids; [Vd, V): CE only
  // c is NaN: the row has no divergence, and so no gradient (NaN over [0, Vd), whatever CE adds)
  const bool div_nan = use_div && c != c;
  // the teacher is taken relative to ref for reverse KL (div_grad), to m_t otherwise
  const float m_a = DIV == kReverseKL ? stp[7] : stp[0], ls_a = stp[1], m_b = stp[2], ls_b = stp[3];
  const float m_1 = stp[5], ls_1_2 = stp[6] * kLog2e;  // log2 units: one FFMA before the ex2
  const bool ce_fold = use_div && p.inv_t == 1.0f && Vd == V;  // softmax(s) is q: one exp less
  const bool ce_own = DIV == kNone || (gc != 0.0f && !ce_fold);  // id 0: gc != 0 here (masked rows returned)
  const float coef = gd * p.inv_t, ce_coef = ce_fold ? gc : 0.0f;
  const float k2 = p.inv_t * kLog2e, ls_a2 = ls_a * kLog2e, ls_b2 = ls_b * kLog2e;  // the KLs' exponents, log2 units
  const bool t_vec = DIV != kNone && group_aligned(t, shift);

  by_form<DIV>(dp, [&](auto form) {
    for (int64_t g = g_begin + threadIdx.x; g < g_end; g += blockDim.x) {
      const int64_t start = g * kVec - shift;
      float sv[kVec], out[kVec];
      load_group(s, start, V, true, sv);
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = 0.0f;
      if constexpr (DIV != kNone) {
        if (start < Vd && div_nan) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) out[i] = start + i < Vd ? kNaN : 0.0f;
        } else if (start < Vd) {
          float tv[kVec];
          load_group(t, start, Vd, t_vec, tv);
          auto term = [&](int i) {
            const float ra = tv[i] - m_a, rb = sv[i] - m_b;
            constexpr bool pq = is_online(DIV) || DIV == kTVD;  // p and q alone: exponents in log2, one FFMA each
            const float lp = pq ? 0.0f : ra * p.inv_t - ls_a, lq = pq ? 0.0f : rb * p.inv_t - ls_b;
            const float pj = pq ? fexp2(ra * k2 - ls_a2) : fexp(lp), qj = pq ? fexp2(rb * k2 - ls_b2) : fexp(lq);
            const float rel = (rb - ra) * p.inv_t;  // reverse KL only (div_grad)
            return coef * div_grad<DIV, decltype(form)::value>(lp, lq, pj, qj, rel, c, dp) + ce_coef * qj;
          };
#pragma unroll
          for (int i = 0; i < kVec; ++i) out[i] = term(i);
          if (start + kVec > Vd) {  // the group holding div_vocab: no divergence gradient past it
#pragma unroll
            for (int i = 0; i < kVec; ++i) out[i] = start + i < Vd ? out[i] : 0.0f;
          }
        }
      }
      if (ce_own) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[i] += gc * fexp2((sv[i] - m_1) * kLog2e - ls_1_2);
      }
      if (static_cast<uint64_t>(y - start) < kVec) {  // the label's group (y = -1: none): once per row
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[i] -= start + i == y ? gc : 0.0f;  // unrolled: no dynamic register index
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = flush(out[i], kFlushBelow);
      store_group(gr, start, V, g_vec, out);
    }
  });
}

// -- host side ---------------------------------------------------------------------------
// DISTILLKIT_CUDA_PATH=stream forces the mixtures' forward onto the streaming path (tests
// compare both); read per call, so a process can switch.
bool force_stream() {
  const char* env = std::getenv("DISTILLKIT_CUDA_PATH");
  return env != nullptr && std::strcmp(env, "stream") == 0;
}

// Largest dynamic shared memory a block may opt into, per device (a cached attribute query, no sync).
int max_dynamic_smem(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cache[device] = optin - 1024;  // the kernel's static reduction scratch
  }
  return cache[device];
}

int forward_threads(int64_t groups) { return groups >= 4096 ? 512 : (groups >= 1024 ? 256 : 128); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_forward_cuda(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
    int64_t divergence, double param_a, double param_b, double temperature, int64_t ignore_index, bool with_ce,
    int64_t div_vocab) {
  const Rows r = check_rows_forward(student, teacher, labels, divergence, param_a, param_b, temperature, with_ce,
                                    div_vocab, at::kCUDA);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(at::kFloat);
  at::Tensor div = at::empty({r.n}, opts), ce = at::empty({r.n}, opts), stats = at::empty({r.n, 8}, opts);
  if (r.n == 0) return {div, ce, stats};
  FwdParams p{make_row_inputs(r, student, teacher, labels, temperature, ignore_index, with_ce)};
  p.div = div.data_ptr<float>();
  p.ce = ce.data_ptr<float>();
  p.stats = stats.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t groups = (r.vocab + kVec - 1) / kVec + 1;  // upper bound over the row shifts
  const int threads = forward_threads(groups);
  const auto tt = r.read_teacher ? teacher->scalar_type() : student.scalar_type();
  dispatch<__nv_bfloat16, __half>(divergence, student.scalar_type(), tt, [&](auto d, auto s_tag, auto t_tag) {
    constexpr int DIV = decltype(d)::value;
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    const DivParams<DIV> dp = make_div_params<DIV>(param_a, param_b);
    if constexpr (is_two_pass(DIV)) {
      const int64_t div_groups = (r.div_vocab + kVec - 1) / kVec + 1;  // the smem rows: divergence ids only
      const size_t smem = ((div_groups * kVec * sizeof(TS) + 15) & ~size_t{15}) + div_groups * kVec * sizeof(TT);
      const bool fits = static_cast<int64_t>(smem) <= max_dynamic_smem(student.get_device());
      if (fits && !force_stream()) {
        auto kernel = forward_smem_kernel<DIV, TS, TT>;
        if (smem > 48 * 1024) {  // beyond the default carve-out a kernel must opt in
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
        }
        kernel<<<static_cast<unsigned>(r.n), threads, smem, stream>>>(p, dp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    forward_stream_kernel<DIV, TS, TT><<<static_cast<unsigned>(r.n), threads, 0, stream>>>(p, dp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {div, ce, stats};
}

at::Tensor rows_backward_cuda(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                              const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& labels,
                              const at::Tensor& stats, int64_t divergence, double param_a, double param_b,
                              double temperature, int64_t ignore_index, bool with_ce, int64_t div_vocab) {
  const Rows r = check_rows_backward(grad_div, grad_ce, student, teacher, labels, stats, divergence, param_a,
                                     param_b, temperature, with_ce, div_vocab, at::kCUDA);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad = at::empty({r.n, r.vocab}, student.options());
  if (r.n == 0) return grad;
  BwdParams p{make_row_inputs(r, student, teacher, labels, temperature, ignore_index, with_ce)};
  p.grad_div = grad_div.data_ptr<float>();
  p.grad_ce = grad_ce.data_ptr<float>();
  p.gd_stride = grad_div.stride(0);
  p.gc_stride = grad_ce.stride(0);
  p.stats = stats.data_ptr<float>();
  p.grad = grad.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t groups = (r.vocab + kVec - 1) / kVec + 1;
  const int64_t parts = std::min<int64_t>(
      65535, std::max<int64_t>(1, (groups + kBwdThreads * kBwdGroupsPerThread - 1) /
                                      (kBwdThreads * kBwdGroupsPerThread)));
  const dim3 grid(static_cast<unsigned>(r.n), static_cast<unsigned>(parts));
  const auto tt = r.read_teacher ? teacher->scalar_type() : student.scalar_type();
  dispatch<__nv_bfloat16, __half>(divergence, student.scalar_type(), tt, [&](auto d, auto s_tag, auto t_tag) {
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    constexpr int DIV = decltype(d)::value;
    backward_kernel<DIV, TS, TT><<<grid, kBwdThreads, 0, stream>>>(p, make_div_params<DIV>(param_a, param_b));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace distillkit::cuda

TORCH_LIBRARY_IMPL(distillkit_ext, CUDA, m) {
  m.impl("rows_forward", &distillkit::cuda::rows_forward_cuda);
  m.impl("rows_backward", &distillkit::cuda::rows_backward_cuda);
}
