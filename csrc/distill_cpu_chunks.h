// Chunk primitives of the CPU kernel (distill_cpu.cpp): conversions between the
// logits dtypes and fp32 stack buffers, and the branch-free loops over those
// buffers. Every DK_CLONES function is compiled three times (AVX-512, AVX2+FMA,
// baseline x86-64) and the loader picks one for the CPU at hand; the loops are
// `omp simd` (-fopenmp) over the float math of distill_math.h, which is written
// without branches so that GCC vectorizes them (with -fno-trapping-math).
// The exp-bound loops also have hand-written AVX-512 versions
// (distill_cpu_avx512.h); the dispatch at the end of this file picks those at
// run time where the CPU has AVX-512, and the portable ones otherwise.
//
// Buffers hold kChunk logits minus a shift (0 in pass 1; the row's raw max m once it is
// known), padded with -inf to a multiple of kLanes: padding lanes contribute exactly 0 to
// every sum (e^-inf = 0, p = q = 0 terms are 0). The loops multiply by 1/T after that
// subtraction, never before (distill_math.h says why).
// Defines (not only declares) the clone functions: include it from one file only.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "distill_cpu_avx512.h"
#include "distill_math.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
// One body, three instruction sets; the loader picks the best the CPU has.
#define DK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DK_CLONES
#endif
#define DK_INLINE inline __attribute__((always_inline))

namespace distillkit::cpu {

constexpr int64_t kChunk = 256;  // floats per buffer (1 KB); see prefetch_next for why not more
constexpr int64_t kLanes = 16;   // buffers are padded to whole AVX-512 registers

DK_INLINE int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// fp16 <-> fp32 without branches (FP16 library formulas), so the loops vectorize.
DK_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | mag);
}

DK_INLINE uint16_t float_to_half(float f) {
  float base = ((f < 0.0f ? -f : f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

DK_INLINE uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  const uint32_t u = float_to_bits(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : r);
}

// -- chunk loads: dst[i] = src[i] - shift in fp32, -inf padding; returns the chunk max --
// (the max skips NaN; the exp sums carry it, see div_bad)
DK_INLINE void pad_tail(float* dst, int64_t n) {
  for (int64_t i = n; i < padded(n); ++i) dst[i] = kNegInf;
}

// Each load prefetches the next chunk of its row (hardware stream prefetchers stop
// at 4 KB page boundaries). The chunk is small on purpose: the prefetches go out in
// one burst, and while they wait for memory the core stalls on its fill buffers.
// With 1 KB chunks (32 lines for student and teacher together) the bursts stay short
// and the exp math runs while the next lines arrive; with 4 KB chunks the forward
// took 71 ms instead of 53 ms on 4096x32000 fp32 (2-core Xeon, docs/PERFORMANCE.md).
DK_INLINE void prefetch_next(const void* next, int64_t bytes) {
  const char* p = static_cast<const char*>(next);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

#define DK_LOADER(NAME, SRC_T, CONVERT)                                                \
  DK_CLONES float NAME(const SRC_T* __restrict src, int64_t n, float shift,           \
                       float* __restrict dst) {                                       \
    prefetch_next(src + n, n * static_cast<int64_t>(sizeof(SRC_T)));                 \
    float mx = kNegInf;                                                               \
    _Pragma("omp simd reduction(max : mx)") for (int64_t i = 0; i < n; ++i) {         \
      const float v = CONVERT(src[i]) - shift;                                        \
      dst[i] = v;                                                                     \
      mx = v > mx ? v : mx;                                                           \
    }                                                                                 \
    pad_tail(dst, n);                                                                 \
    return mx;                                                                        \
  }

DK_INLINE float from_f32(float v) { return v; }
DK_INLINE float from_bf16(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
DK_LOADER(load_f32, float, from_f32)
DK_LOADER(load_bf16, uint16_t, from_bf16)
DK_LOADER(load_f16, uint16_t, half_to_float)

DK_CLONES void store_f32(const float* __restrict src, int64_t n, float* __restrict dst) {
  std::memcpy(dst, src, n * sizeof(float));
}
DK_CLONES void store_bf16(const float* __restrict src, int64_t n, uint16_t* __restrict dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}
DK_CLONES void store_f16(const float* __restrict src, int64_t n, uint16_t* __restrict dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

template <typename T>
DK_INLINE float load_chunk(const T* src, int64_t n, float shift, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    return load_f32(src, n, shift, dst);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return load_bf16(reinterpret_cast<const uint16_t*>(src), n, shift, dst);
  } else {
    return load_f16(reinterpret_cast<const uint16_t*>(src), n, shift, dst);
  }
}

template <typename T>
DK_INLINE void store_chunk(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    store_f32(src, n, dst);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    store_bf16(src, n, reinterpret_cast<uint16_t*>(dst));
  } else {
    store_f16(src, n, reinterpret_cast<uint16_t*>(dst));
  }
}

// The stats of one row the loops need: log-sums ls (log p = (t - m_t) / T - ls_a, log q =
// (s - m_s) / T - ls_b, the maxima already subtracted by the loads), c, and 1/T.
struct RowStats {
  float ls_a, ls_b, c, inv_t;
};

// x / T; the pass-1 loops are compiled twice and skip the multiply at T = 1 (the same float).
template <bool SCALED>
DK_INLINE float over_t(float x, float inv_t) {
  return SCALED ? x * inv_t : x;
}

// -- portable versions of the exp-bound loops (the AVX-512 ones are in distill_cpu_avx512.h) --
namespace portable {

// pass-1 sums over raw x (n is a multiple of kLanes; padding lanes are -inf -> 0):
// sum e^((x - rx) / T)
template <bool SCALED>
DK_INLINE float sum_exp_impl(const float* __restrict x, int64_t n, float rx, float inv_t) {
  float z = 0.0f;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) z += fexp(over_t<SCALED>(x[i] - rx, inv_t));
  return z;
}

template <bool SCALED>
DK_INLINE void sum_exp2_impl(const float* __restrict x, const float* __restrict y, int64_t n, float rx, float ry,
                             float inv_t, float* out) {
  float zx = 0.0f, zy = 0.0f;
#pragma omp simd reduction(+ : zx, zy)
  for (int64_t i = 0; i < n; ++i) {
    zx += fexp(over_t<SCALED>(x[i] - rx, inv_t));
    zy += fexp(over_t<SCALED>(y[i] - ry, inv_t));
  }
  out[0] = zx;
  out[1] = zy;
}

// z_x = sum e, w = sum e ((x - rx) - (y - ref)) (raw units) over e = e^((x - rx) / T) > 0
// (x = -inf adds 0, not 0 * inf), z_y = sum e^((y - ry) / T). distill_math.h, kl_move.
template <bool SCALED>
DK_INLINE void kl_sums_impl(const float* __restrict x, const float* __restrict y, int64_t n, float rx, float ry,
                            float ref, float inv_t, float* out) {
  float zx = 0.0f, w = 0.0f, zy = 0.0f;
#pragma omp simd reduction(+ : zx, w, zy)
  for (int64_t i = 0; i < n; ++i) {
    const float dx = x[i] - rx;
    const float e = fexp(over_t<SCALED>(dx, inv_t));
    const float term = e * (dx - (y[i] - ref));
    zx += e;
    w += e > 0.0f ? term : 0.0f;
    zy += fexp(over_t<SCALED>(y[i] - ry, inv_t));
  }
  out[0] = zx;
  out[1] = w;
  out[2] = zy;
}

DK_CLONES float sum_exp(const float* x, int64_t n, float rx, float inv_t) {
  if (inv_t == 1.0f) return sum_exp_impl<false>(x, n, rx, inv_t);
  return sum_exp_impl<true>(x, n, rx, inv_t);
}
DK_CLONES void sum_exp2(const float* x, const float* y, int64_t n, float rx, float ry, float inv_t, float* out) {
  if (inv_t == 1.0f) return sum_exp2_impl<false>(x, y, n, rx, ry, inv_t, out);
  sum_exp2_impl<true>(x, y, n, rx, ry, inv_t, out);
}
DK_CLONES void kl_sums(const float* x, const float* y, int64_t n, float rx, float ry, float ref, float inv_t,
                       float* out) {
  if (inv_t == 1.0f) return kl_sums_impl<false>(x, y, n, rx, ry, ref, inv_t, out);
  kl_sums_impl<true>(x, y, n, rx, ry, ref, inv_t, out);
}

// out = gc * softmax(s) = gc * e^(x - ls_1) over x = s - m_1 (accumulate: out +=), then flushed below thr.
DK_CLONES void grad_ce(const float* __restrict x, int64_t n, float ls1, float gc, bool accumulate, float thr,
                       float* __restrict out) {
  if (accumulate) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = flush(out[i] + gc * fexp(x[i] - ls1), thr);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = flush(gc * fexp(x[i] - ls1), thr);
  }
}

}  // namespace portable

// max of y over {i : x_i == x_max}: y at the chunk's argmax of x (the one-pass KLs' ref). Only
// called when the chunk moves the running max, so no AVX-512 version.
DK_CLONES float y_at_max(const float* __restrict x, const float* __restrict y, int64_t n, float x_max) {
  float r = kNegInf;
#pragma omp simd reduction(max : r)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] == x_max ? y[i] : kNegInf;
    r = v > r ? v : r;
  }
  return r;
}

// -- pass 2 of the two-pass divergences: out += (sum d_j, sum h_j); a = t - m_a, b = s - m_b -----
template <int DIV, int FORM>
DK_INLINE void mix_sums_impl(const float* __restrict a, const float* __restrict b, int64_t n, RowStats rs,
                             DivParams<DIV> dp, double* out) {
  float dsum = 0.0f, csum = 0.0f;
#pragma omp simd reduction(+ : dsum, csum)
  for (int64_t i = 0; i < n; ++i) {
    const float lp = a[i] * rs.inv_t - rs.ls_a, lq = b[i] * rs.inv_t - rs.ls_b;
    float d, h;
    div_terms<DIV, FORM>(lp, lq, fexp(lp), fexp(lq), dp, d, h);
    dsum += d;
    csum += h;
  }
  out[0] += dsum;
  out[1] += csum;
}

// -- backward: out = coef (h - q c) + ce_coef q (softmax(s) = q when T == 1), flushed below thr --
// b = s - m_s, a = t - m_t (t - ref for reverse KL, whose rel = (b - a) / T: div_grad).
template <int DIV, int FORM>
DK_INLINE void grad_div_impl(const float* __restrict a, const float* __restrict b, int64_t n, RowStats rs,
                             float coef, float ce_coef, float thr, DivParams<DIV> dp, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float lp = a[i] * rs.inv_t - rs.ls_a, lq = b[i] * rs.inv_t - rs.ls_b;  // lp: dead for reverse KL
    const float p = fexp(lp), q = fexp(lq);
    const float rel = (b[i] - a[i]) * rs.inv_t;  // reverse KL only
    out[i] = flush(coef * div_grad<DIV, FORM>(lp, lq, p, q, rel, rs.c, dp) + ce_coef * q, thr);
  }
}

// One clone set per divergence.
#define DK_MIX(D)                                                                                      \
  DK_CLONES void mix_sums_##D(const float* a, const float* b, int64_t n, RowStats rs, DivParams<D> dp, \
                              double* out) {                                                           \
    mix_sums_impl<D, 0>(a, b, n, rs, dp, out);                                                         \
  }
#define DK_GRAD(D)                                                                                     \
  DK_CLONES void grad_div_##D(const float* a, const float* b, int64_t n, RowStats rs, float coef,      \
                              float ce_coef, float thr, DivParams<D> dp, float* out) {                 \
    grad_div_impl<D, 0>(a, b, n, rs, coef, ce_coef, thr, dp, out);                                     \
  }
DK_MIX(3) DK_MIX(4) DK_MIX(5) DK_MIX(6)
DK_GRAD(1) DK_GRAD(2) DK_GRAD(3) DK_GRAD(4) DK_GRAD(5) DK_GRAD(6)
#undef DK_MIX
#undef DK_GRAD

// alpha-beta: one loop per form, picked once per chunk, not per element (explicit branches: a lambda
// would be compiled for the default target rather than per clone).
DK_CLONES void mix_sums_7(const float* a, const float* b, int64_t n, RowStats rs, AlphaBetaParams ab,
                          double* out) {
  if (ab.form == kAbBoth) return mix_sums_impl<kAlphaBeta, kAbBoth>(a, b, n, rs, ab, out);
  if (ab.form == kAbAlphaOnly) return mix_sums_impl<kAlphaBeta, kAbAlphaOnly>(a, b, n, rs, ab, out);
  mix_sums_impl<kAlphaBeta, kAbBetaOnly>(a, b, n, rs, ab, out);
}
DK_CLONES void grad_div_7(const float* a, const float* b, int64_t n, RowStats rs, float coef, float ce_coef,
                          float thr, AlphaBetaParams ab, float* out) {
  if (ab.form == kAbBoth) return grad_div_impl<kAlphaBeta, kAbBoth>(a, b, n, rs, coef, ce_coef, thr, ab, out);
  if (ab.form == kAbAlphaOnly) return grad_div_impl<kAlphaBeta, kAbAlphaOnly>(a, b, n, rs, coef, ce_coef, thr, ab, out);
  grad_div_impl<kAlphaBeta, kAbBetaOnly>(a, b, n, rs, coef, ce_coef, thr, ab, out);
}

template <int DIV, typename... Args>
DK_INLINE void mix_sums(Args... args) {
  if constexpr (DIV == kJSD) mix_sums_3(args...);
  else if constexpr (DIV == kSkewForwardKL) mix_sums_4(args...);
  else if constexpr (DIV == kSkewReverseKL) mix_sums_5(args...);
  else if constexpr (DIV == kTVD) mix_sums_6(args...);
  else if constexpr (DIV == kAlphaBeta) mix_sums_7(args...);
  else static_assert(always_false<DIV>, "mix_sums: not a two-pass divergence id");
}

// -- dispatch: hand-written AVX-512 loops where the CPU has them ------------------
// DISTILLKIT_CPU_CAPABILITY=portable forces the compiler-vectorized loops (read once);
// the tests run both.
inline bool use_avx512() {
#if defined(DK_HAVE_AVX512_LOOPS)
  static const bool enabled = [] {
    const char* env = std::getenv("DISTILLKIT_CPU_CAPABILITY");
    if (env != nullptr && std::strcmp(env, "portable") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return enabled;
#else
  return false;
#endif
}

#if defined(DK_HAVE_AVX512_LOOPS)
#define DK_PICK(NAME, ...) return use_avx512() ? avx512::NAME(__VA_ARGS__) : portable::NAME(__VA_ARGS__)
#else
#define DK_PICK(NAME, ...) return portable::NAME(__VA_ARGS__)
#endif

DK_INLINE float sum_exp(const float* x, int64_t n, float rx, float inv_t) { DK_PICK(sum_exp, x, n, rx, inv_t); }
DK_INLINE void sum_exp2(const float* x, const float* y, int64_t n, float rx, float ry, float inv_t, float* out) {
  DK_PICK(sum_exp2, x, y, n, rx, ry, inv_t, out);
}
DK_INLINE void kl_sums(const float* x, const float* y, int64_t n, float rx, float ry, float ref, float inv_t,
                       float* out) {
  DK_PICK(kl_sums, x, y, n, rx, ry, ref, inv_t, out);
}
DK_INLINE void grad_ce(const float* x, int64_t n, float ls1, float gc, bool accumulate, float thr, float* out) {
  DK_PICK(grad_ce, x, n, ls1, gc, accumulate, thr, out);
}
#undef DK_PICK

// The KL gradients: AVX-512 where picked, else the portable grad_div_1 / grad_div_2 (dp unused by both).
template <int DIV>
DK_INLINE void grad_kl(const float* a, const float* b, int64_t n, RowStats rs, float coef, float ce_coef, float thr,
                       DivParams<DIV> dp, float* out) {
#if defined(DK_HAVE_AVX512_LOOPS)
  if (use_avx512()) {
    if constexpr (DIV == kForwardKL) {
      return avx512::grad_forward_kl(a, b, n, rs.ls_a, rs.ls_b, rs.inv_t, coef, ce_coef, thr, out);
    } else {
      return avx512::grad_reverse_kl(a, b, n, rs.ls_b, rs.c, rs.inv_t, coef, ce_coef, thr, out);
    }
  }
#endif
  if constexpr (DIV == kForwardKL) grad_div_1(a, b, n, rs, coef, ce_coef, thr, dp, out);
  else grad_div_2(a, b, n, rs, coef, ce_coef, thr, dp, out);
}

template <int DIV, typename... Args>
DK_INLINE void grad_div(Args... args) {
  if constexpr (DIV == kForwardKL || DIV == kReverseKL) grad_kl<DIV>(args...);
  else if constexpr (DIV == kJSD) grad_div_3(args...);
  else if constexpr (DIV == kSkewForwardKL) grad_div_4(args...);
  else if constexpr (DIV == kSkewReverseKL) grad_div_5(args...);
  else if constexpr (DIV == kTVD) grad_div_6(args...);
  else if constexpr (DIV == kAlphaBeta) grad_div_7(args...);
  else static_assert(always_false<DIV>, "grad_div: a divergence id without a gradient loop");
}

}  // namespace distillkit::cpu
