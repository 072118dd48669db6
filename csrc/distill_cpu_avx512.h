// Hand-written AVX-512 versions of the exp-bound chunk loops of the CPU kernel.
// distill_cpu_chunks.h holds the portable (compiler-vectorized) versions and picks
// these at run time when the CPU has AVX-512 (see use_avx512 there).
//
// Why they exist: in cache, forward and backward are bound by e^x (two per element
// each way). GCC turns the portable fexp into ~25 instructions per 16 lanes: 2^n is
// built from exponent bits and the range clamps become mask juggling. vscalefps
// builds p * 2^n in one instruction, so exp16 is 13. Measured on one core of the
// 2-core Xeon, in L1: kl_sums 0.42 vs 0.53 ns per element, the forward-KL gradient
// 0.39 vs 0.50; end to end it shows where the kernel is compute-bound rather than
// memory-bound (bf16 forward + backward at 4096x32000: 137 vs 148 ms).
//
// Same math as the portable loops: the same range reduction and polynomial as fexp
// (distill_math.h), e^x = 0 below the smallest normal, NaN propagates (the row's
// NaN check reads it from the sums: the loaders' max drops NaN). Buffers are
// the same padded stack buffers (-inf padding to a multiple of 16), so every loop
// runs whole vectors; only a store to the caller's memory is masked at the tail.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define DK_HAVE_AVX512_LOOPS 1
#include <immintrin.h>

#include <cstdint>

#include "distill_math.h"

// Every function here needs the CPU check before it is called.
#define DK_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define DK_AVX512_INLINE DK_AVX512 inline __attribute__((always_inline))

// GCC 12 flags the deliberately undefined vectors inside its own reduction intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace distillkit::cpu::avx512 {

// e^x for 16 lanes: n = round(x log2 e), r = x - n ln2 (Cody-Waite, two parts),
// e^r by the degree-5 polynomial of fexp, then p * 2^n by vscalefps. `live` gets
// the lanes whose result is not 0 (x >= lo, or NaN).
DK_AVX512_INLINE __m512 exp16(__m512 x, __mmask16& live) {
  using K = ExpConsts;
  const __m512 lo = _mm512_set1_ps(K::lo);
  // below lo the result is 0 (as in fexp); "not less than, unordered" keeps NaN lanes
  live = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
  __m512 xc = _mm512_max_ps(lo, x);  // max/min return their second operand on NaN: NaN survives
  xc = _mm512_min_ps(_mm512_set1_ps(K::hi), xc);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(K::log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(K::ln2_hi), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(K::ln2_lo), r);
  __m512 p = _mm512_set1_ps(K::c5);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

DK_AVX512_INLINE __m512 exp16(__m512 x) {
  __mmask16 live;
  return exp16(x, live);
}

DK_AVX512_INLINE __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

// The gradient loops take thr = FLT_MIN (kFlushBelow: the entries below it, i.e. the subnormal
// lanes, become 0; one vfpclassps, NaN kept) or thr = 0 (no flush: a value the next loop adds
// to), and are compiled for both.
template <bool FLUSH>
DK_AVX512_INLINE __m512 flush16(__m512 g) {
  if constexpr (FLUSH) return _mm512_mask_mov_ps(g, _mm512_fpclass_ps_mask(g, 0x20), _mm512_setzero_ps());
  else return g;
}

// f.template operator()<FLUSH>() for thr.
template <typename Fn>
DK_AVX512_INLINE void by_flush(float thr, Fn&& f) {
  if (thr == 0.0f) f.template operator()<false>();
  else f.template operator()<true>();
}

// (x - r) / T: subtract, then multiply (distill_math.h); no multiply at T = 1 (the same float).
template <bool SCALED>
DK_AVX512_INLINE __m512 scaled(__m512 x, __m512 r, __m512 inv_t) {
  const __m512 d = _mm512_sub_ps(x, r);
  return SCALED ? _mm512_mul_ps(d, inv_t) : d;
}

// -- pass-1 sums over raw x (n a multiple of 16): sum e^((x - rx) / T) -------------
template <bool SCALED>
DK_AVX512_INLINE float sum_exp_impl(const float* x, int64_t n, float rx, float inv_t) {
  const __m512 vrx = _mm512_set1_ps(rx), vit = _mm512_set1_ps(inv_t);
  __m512 z = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    z = _mm512_add_ps(z, exp16(scaled<SCALED>(_mm512_loadu_ps(x + i), vrx, vit)));
  }
  return _mm512_reduce_add_ps(z);
}

template <bool SCALED>
DK_AVX512_INLINE void sum_exp2_impl(const float* x, const float* y, int64_t n, float rx, float ry, float inv_t,
                                    float* out) {
  const __m512 vrx = _mm512_set1_ps(rx), vry = _mm512_set1_ps(ry), vit = _mm512_set1_ps(inv_t);
  __m512 zx = _mm512_setzero_ps(), zy = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    zx = _mm512_add_ps(zx, exp16(scaled<SCALED>(_mm512_loadu_ps(x + i), vrx, vit)));
    zy = _mm512_add_ps(zy, exp16(scaled<SCALED>(_mm512_loadu_ps(y + i), vry, vit)));
  }
  out[0] = _mm512_reduce_add_ps(zx);
  out[1] = _mm512_reduce_add_ps(zy);
}

// z_x = sum e, w = sum e ((x - rx) - (y - ref)) (raw units) over lanes with e = e^((x - rx) / T) > 0,
// z_y = sum e^((y - ry) / T).
template <bool SCALED>
DK_AVX512_INLINE void kl_sums_impl(const float* x, const float* y, int64_t n, float rx, float ry, float ref,
                                   float inv_t, float* out) {
  const __m512 vrx = _mm512_set1_ps(rx), vry = _mm512_set1_ps(ry), vref = _mm512_set1_ps(ref);
  const __m512 vit = _mm512_set1_ps(inv_t);
  __m512 zx = _mm512_setzero_ps(), w = zx, zy = zx;
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 yv = _mm512_loadu_ps(y + i);
    const __m512 dx = _mm512_sub_ps(_mm512_loadu_ps(x + i), vrx);
    __mmask16 live;  // e > 0 (or NaN): x = -inf adds 0 to w, not 0 * inf
    const __m512 e = exp16(SCALED ? _mm512_mul_ps(dx, vit) : dx, live);
    zx = _mm512_add_ps(zx, e);
    w = _mm512_mask3_fmadd_ps(e, _mm512_sub_ps(dx, _mm512_sub_ps(yv, vref)), w, live);
    zy = _mm512_add_ps(zy, exp16(scaled<SCALED>(yv, vry, vit)));
  }
  out[0] = _mm512_reduce_add_ps(zx);
  out[1] = _mm512_reduce_add_ps(w);
  out[2] = _mm512_reduce_add_ps(zy);
}

DK_AVX512 inline float sum_exp(const float* x, int64_t n, float rx, float inv_t) {
  if (inv_t == 1.0f) return sum_exp_impl<false>(x, n, rx, inv_t);
  return sum_exp_impl<true>(x, n, rx, inv_t);
}

DK_AVX512 inline void sum_exp2(const float* x, const float* y, int64_t n, float rx, float ry, float inv_t,
                               float* out) {
  if (inv_t == 1.0f) return sum_exp2_impl<false>(x, y, n, rx, ry, inv_t, out);
  sum_exp2_impl<true>(x, y, n, rx, ry, inv_t, out);
}

DK_AVX512 inline void kl_sums(const float* x, const float* y, int64_t n, float rx, float ry, float ref, float inv_t,
                              float* out) {
  if (inv_t == 1.0f) return kl_sums_impl<false>(x, y, n, rx, ry, ref, inv_t, out);
  kl_sums_impl<true>(x, y, n, rx, ry, ref, inv_t, out);
}

// -- backward of forward KL: out[0, n) = flush(coef (q - p) + ce_coef q) ----------------------
// (a = t - m_t, b = s - m_s, padded to a multiple of 16; out is written for n lanes only.)
DK_AVX512 inline void grad_forward_kl(const float* a, const float* b, int64_t n, float ls_a, float ls_b, float inv_t,
                                      float coef, float ce_coef, float thr, float* out) {
  const __m512 vla = _mm512_set1_ps(ls_a), vlb = _mm512_set1_ps(ls_b), vit = _mm512_set1_ps(inv_t);
  const __m512 vcoef = _mm512_set1_ps(coef), vce = _mm512_set1_ps(ce_coef);
  by_flush(thr, [&]<bool FLUSH>() DK_AVX512 {
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 q = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(b + i), vit, vlb));
      const __m512 p = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(a + i), vit, vla));
      const __m512 g = _mm512_fmadd_ps(vcoef, _mm512_sub_ps(q, p), _mm512_mul_ps(vce, q));
      _mm512_mask_storeu_ps(out + i, tail_mask(n - i), flush16<FLUSH>(g));
    }
  });
}

// -- backward of reverse KL: out[0, n) = flush(coef q (rel - c) + ce_coef q) -----------------
// (a = t - ref, b = s - m_s, rel = (b - a) / T: distill_math.h, div_grad.)
DK_AVX512 inline void grad_reverse_kl(const float* a, const float* b, int64_t n, float ls_b, float c, float inv_t,
                                      float coef, float ce_coef, float thr, float* out) {
  const __m512 vlb = _mm512_set1_ps(ls_b), vc = _mm512_set1_ps(c), vit = _mm512_set1_ps(inv_t);
  const __m512 vcoef = _mm512_set1_ps(coef), vce = _mm512_set1_ps(ce_coef);
  by_flush(thr, [&]<bool FLUSH>() DK_AVX512 {
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 bv = _mm512_loadu_ps(b + i);
      __mmask16 live;  // q > 0 (or NaN)
      const __m512 q = exp16(_mm512_fmsub_ps(bv, vit, vlb), live);
      const __m512 rel = _mm512_mul_ps(_mm512_sub_ps(bv, _mm512_loadu_ps(a + i)), vit);
      const __m512 h = _mm512_maskz_mul_ps(live, q, _mm512_sub_ps(rel, vc));  // 0 where q = 0
      const __m512 g = _mm512_fmadd_ps(vcoef, h, _mm512_mul_ps(vce, q));
      _mm512_mask_storeu_ps(out + i, tail_mask(n - i), flush16<FLUSH>(g));
    }
  });
}

// out = gc e^(x - ls_1) over x = s - m_1, or out += it, then flushed below thr (x padded; out
// written for n lanes only).
DK_AVX512 inline void grad_ce(const float* x, int64_t n, float ls1, float gc, bool accumulate, float thr,
                              float* out) {
  const __m512 vl = _mm512_set1_ps(ls1), vgc = _mm512_set1_ps(gc);
  by_flush(thr, [&]<bool FLUSH>() DK_AVX512 {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      __m512 g = _mm512_mul_ps(vgc, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vl)));
      if (accumulate) g = _mm512_add_ps(g, _mm512_maskz_loadu_ps(m, out + i));
      _mm512_mask_storeu_ps(out + i, m, flush16<FLUSH>(g));
    }
  });
}

}  // namespace distillkit::cpu::avx512

#pragma GCC diagnostic pop

#endif
