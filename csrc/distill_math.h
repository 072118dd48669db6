// Per-element math of the fused distillation rows, shared by the CPU kernel
// (plain C++, written so that GCC vectorizes the loops that call it) and the
// CUDA kernels (__host__ __device__). The contract is docs/DESIGN.md:
//
//   x_a = (t - m_t) / T, x_b = (s - m_s) / T with m_* the raw row maxima,
//   log p = x_a - ls_a, log q = x_b - ls_b (ls_* = log sum exp x_*)
//   D(p, q) per divergence id; h_j = q_j dD/dq_j; c = sum_j h_j
//   dD/db_k = h_k - q_k c (reverse KL: relative to the mode, see kl_move)
//   ce = (m_1 - s[y]) + ls_1 at temperature 1 (m_1, ls_1 over the student)
//   D over the ids [0, div_vocab) of both rows, CE over the student's whole row
//
// The divergence ids and what their two parameters (param_a, param_b) mean come from
// distillkit/core/divergences.py, the one table every layer reads.
//
// The max is subtracted before the multiply by 1/T: exact for the entries at the
// max (Sterbenz), and no FMA contraction can turn it into t/T - m with a rounding
// error that the exp then amplifies. Everything is float32, whatever the input dtype.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#else
#define DK_HD inline __attribute__((always_inline))
#endif

namespace distillkit {

// Divergence ids: the table in distillkit/core/divergences.py (its test checks these against it).
enum : int {
  kNone = 0,
  kForwardKL = 1,
  kReverseKL = 2,
  kJSD = 3,
  kSkewForwardKL = 4,
  kSkewReverseKL = 5,
  kTVD = 6,
  kAlphaBeta = 7,
};
constexpr int kMaxDivergenceId = kAlphaBeta;  // the ops reject ids above it (ops.cpp)

// For the static_assert that ends every `if constexpr` chain over the ids: an id added to the
// enum but not to a chain fails to compile instead of computing another divergence.
template <int DIV>
constexpr bool always_false = false;

// Forward KL and reverse KL get D from one online pass; the others need both
// normalizers before the first term (two passes).
constexpr bool is_online(int div) { return div == kForwardKL || div == kReverseKL; }
constexpr bool is_two_pass(int div) {
  return div == kJSD || div == kSkewForwardKL || div == kSkewReverseKL || div == kTVD || div == kAlphaBeta;
}

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

DK_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

DK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// The host exp's constants, shared with the AVX-512 loops (distill_cpu_avx512.h).
struct ExpConsts {
  static constexpr float lo = -87.33654f;  // log of the smallest normal float
  static constexpr float hi = 88.0f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;  // ln2 = ln2_hi - ln2_lo (Cody-Waite)
  static constexpr float ln2_lo = 2.12194440e-4f;
  // e^r ~ 1 + r + c2 r^2 + ... + c5 r^5 on |r| <= ln2/2
  static constexpr float c2 = 4.99992311000824e-1f, c3 = 1.6667111217975616e-1f;
  static constexpr float c4 = 4.1890207678079605e-2f, c5 = 8.31280555576086e-3f;
};

// exp(x). Device: the MUFU approximation (rel. error ~1e-6 near 0, the terms
// that matter), 2^(x log2 e) by ex2.approx.ftz: two instructions (FMUL, MUFU.EX2), and
// results below the smallest normal float are 0, as on the host (__expf's non-ftz ex2
// spent a compare and two predicated multiplies on producing those subnormals).
// Host: branch-free, so the loops that call it vectorize: 2^n by building the
// exponent bits, e^r on |r| <= ln2/2 by a degree-5 polynomial (rel. error < 2e-7).
// exp(-inf) = 0 exactly and anything below the smallest normal float is 0
// (masked entries must give 0, never NaN); NaN propagates
// (it survives both clamps). Arguments here are <= ~0 (x - max, log-probs);
// the upper clamp only keeps garbage statistics from wrapping the exponent.
DK_HD float fexp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * ExpConsts::log2e));
  return y;
#else
  using K = ExpConsts;
  float xc = x < K::lo ? K::lo : x;
  xc = xc > K::hi ? K::hi : xc;
  // t = round(x / ln2) + 127 + 1.5 * 2^23: its low mantissa bits are the biased exponent
  const float magic = 12582912.0f + 127.0f;
  const float t = xc * K::log2e + magic;
  const float n = t - magic;
  float r = xc - n * K::ln2_hi;
  r = r + n * K::ln2_lo;
  float p = K::c5;
  p = p * r + K::c4;
  p = p * r + K::c3;
  p = p * r + K::c2;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float res = p * bits_to_float(float_to_bits(t) << 23);
  return x < K::lo ? 0.0f : res;
#endif
}

// log(v) for v in [1, 2] (the log1p of the mixture's log-add-exp). Host: Cephes
// logf polynomial, branch-free; device: MUFU (abs. error ~5e-7 on [1, 2]).
DK_HD float flog_1_2(float v) {
#if defined(__CUDA_ARCH__)
  return __logf(v);
#else
  const bool big = v > 1.41421356f;
  const float f = big ? v * 0.5f : v;
  const float k = big ? 1.0f : 0.0f;
  const float x = f - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y = y - k * 2.12194440e-4f - 0.5f * z;
  return x + y + k * 0.693359375f;
#endif
}

// Row-level (scalar) logarithm: accurate on both sides.
DK_HD float flog_row(float v) {
#if defined(__CUDA_ARCH__)
  return logf(v);
#else
  return __builtin_logf(v);
#endif
}

DK_HD float fmax2(float a, float b) { return a > b ? a : b; }

// -- online softmax ----------------------------------------------------------
// A running (m, z) is the raw max m and z = sum exp((x - m) / T). With m = -inf
// (nothing but masked entries so far) x - m would be NaN; the reference is then 0.
DK_HD float safe_ref(float m) { return m == kNegInf ? 0.0f : m; }

// w (a sum of e * (x - y)) can be +inf (reverse KL on a teacher zero); keep it
// +inf when its scale underflows instead of producing inf * 0 = NaN.
DK_HD float rescale(float w, float scale) { return w == kInf ? w : w * scale; }

// exp((m - ref) / T): the factor that moves a sum from max m to the reference ref.
DK_HD float shift_scale(float m, float ref, float inv_t) { return fexp((m - ref) * inv_t); }

// Merge (m2, z2, w2) into (m, z, w): the max, and the sums rescaled to it.
DK_HD void online_merge(float& m, float& z, float& w, float m2, float z2, float w2, float inv_t) {
  const float mn = fmax2(m, m2);
  const float ref = safe_ref(mn);
  const float s1 = shift_scale(m, ref, inv_t), s2 = shift_scale(m2, ref, inv_t);
  z = z * s1 + z2 * s2;
  w = rescale(w, s1) + rescale(w2, s2);
  m = mn;
}

DK_HD void online_merge(float& m, float& z, float m2, float z2, float inv_t) {
  const float mn = fmax2(m, m2);
  const float ref = safe_ref(mn);
  z = z * shift_scale(m, ref, inv_t) + z2 * shift_scale(m2, ref, inv_t);
  m = mn;
}

// ls = log z of the final (m, z); lse(x / T) = m / T + ls, never formed (it would round
// away the small log-probabilities once |m / T| is large).
DK_HD float finish_ls(float z) { return flog_row(z); }

// -- one-pass KL(softmax(x/T) || softmax(y/T)) ---------------------------------
// State (m, z, w, ref): m the running raw max of x, z = sum e, w = sum e ((x - m) - (y - ref))
// over e = exp((x - m) / T) > 0, ref = y at x's argmax. Terms relative to the mode on both
// sides: the dominant one is exactly 0, and nothing of the size of the logits cancels later
// (terms y - x at logits of 1e4 were rounded to 1e-3). ref is the y at the argmax of the
// block that moved the max; a -inf there keeps the old (finite) ref, and the +inf term then
// gives the +inf divergence. Forward KL: x = t, y = s; reverse KL: x = s, y = t.
//
// kl_move: the state moved to max m_new and reference ref_new; the terms shift by
// (m - m_ref) + (ref_new - ref), then z and w rescale. Returns m_ref = safe_ref(m_new), the
// reference of the next terms. Also merges states (CUDA threads): each moved to the max.
DK_HD float kl_move(float& m, float& z, float& w, float& ref, float m_new, float ref_new, float inv_t) {
  const float m_ref = safe_ref(m_new);
  const float sc = shift_scale(m, m_ref, inv_t);
  const float shifted = z > 0.0f ? w + z * ((m - m_ref) + (ref_new - ref)) : w;
  w = rescale(shifted, sc);
  z *= sc;
  m = m_new;
  ref = ref_new;
  return m_ref;
}

// Finish (x_a = (t - m_t) / T, x_b = (s - m_s) / T):
//   forward KL = E_p[x_a - x_b] + ls_b - ls_a, x_a - x_b = (((t - m_t) - (s - ref)) + (m_s - ref)) / T
DK_HD float forward_kl_div(float w, float z_a, float m_s, float ref, float ls_a, float ls_b, float inv_t) {
  return (w / z_a + (m_s - ref)) * inv_t + (ls_b - ls_a);
}

//   reverse KL: c = E_q[(s - m_s) - (t - ref)] / T (small near the mode; the backward's
//   q (rel - c) uses the same terms) and D = c + (m_t - ref) / T - (ls_b - ls_a)
DK_HD float reverse_kl_c(float w, float z_b, float inv_t) { return w / z_b * inv_t; }

DK_HD float reverse_kl_div(float c, float m_t, float ref, float ls_a, float ls_b, float inv_t) {
  return c + (m_t - ref) * inv_t - (ls_b - ls_a);
}

DK_HD bool finite(float x) { return x > kNegInf && x < kInf; }  // false for NaN too

// A row's divergence is undefined when the teacher or the student over the div ids holds a
// NaN or +inf, or has no finite entry. Decided explicitly from the pass-1 statistics: the
// maxima drop NaN (max instructions), so only the sums carry it, and an all -inf row has
// no NaN at all.
DK_HD bool div_bad(float m_a, float ls_a, float m_b, float ls_b) {
  return !(finite(m_a) && finite(ls_a) && finite(m_b) && finite(ls_b));
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Gradients are stored with every entry below FLT_MIN (the smallest normal fp32 and bf16)
// flushed to 0, whatever the output dtype (compared in fp32, before any conversion; NaN
// stays): GEMMs on x86 slow down ~10x on subnormal inputs, and a sharp teacher fills the
// gradient with them. float16 keeps its own subnormals (2^-24..2^-14): mean-reduced
// gradients live there, and CPU GEMMs widen fp16 to fp32, where they are normal.
constexpr float kFlushBelow = 1.17549435e-38f;  // FLT_MIN
DK_HD float flush(float g, float thr) {
#if defined(__CUDA_ARCH__)
  return fabsf(g) < thr ? 0.0f : g;
#else
  return __builtin_fabsf(g) < thr ? 0.0f : g;  // one and-mask, where g < 0 ? -g : g is three ops
#endif
}

// -- mixtures ----------------------------------------------------------------
// m = w_p p + w_q q with (w_p, w_q) = (beta, 1-beta) for jsd, (skew, 1-skew) for
// skew_forward_kl, (1-skew, skew) for skew_reverse_kl. lw_* = log w_* (-inf for 0).
struct MixParams {
  float w_p, w_q, lw_p, lw_q;
};

inline MixParams make_mix(int div, float mix) {
  MixParams mp{0.0f, 0.0f, kNegInf, kNegInf};
  if (div == kJSD || div == kSkewForwardKL) {
    mp.w_p = mix;
    mp.w_q = 1.0f - mix;
  } else if (div == kSkewReverseKL) {
    mp.w_p = 1.0f - mix;
    mp.w_q = mix;
  }
  mp.lw_p = mp.w_p > 0.0f ? flog_row(mp.w_p) : kNegInf;
  mp.lw_q = mp.w_q > 0.0f ? flog_row(mp.w_q) : kNegInf;
  return mp;
}

// alpha-beta with (alpha, beta) = (param_a, param_b), alpha, beta >= 0, not both 0, in one of three
// forms (docs/DESIGN.md), decided once per call: the loops are instantiated per form, so the branch
// is not taken per element. Constants in double on the host, then rounded once.
enum : int { kAbBoth = 0, kAbAlphaOnly = 1, kAbBetaOnly = 2 };

struct AlphaBetaParams {
  int form;
  float alpha, beta, sum;  // sum = alpha + beta
  float w_p, w_q;          // kAbBoth: alpha / sum, beta / sum
  float k_d, k_h;          // the scales of d and h (alpha_beta_terms)
};

inline AlphaBetaParams make_alpha_beta(double alpha, double beta) {
  AlphaBetaParams ab{kAbBoth, static_cast<float>(alpha), static_cast<float>(beta),
                     static_cast<float>(alpha + beta), 0.0f, 0.0f, 0.0f, 0.0f};
  if (alpha > 0.0 && beta > 0.0) {
    ab.w_p = static_cast<float>(alpha / (alpha + beta));
    ab.w_q = static_cast<float>(beta / (alpha + beta));
    ab.k_d = static_cast<float>(1.0 / (alpha * beta));
    ab.k_h = static_cast<float>(1.0 / alpha);
  } else {
    const double e = alpha > 0.0 ? alpha : beta;  // the one nonzero exponent
    ab.form = alpha > 0.0 ? kAbAlphaOnly : kAbBetaOnly;
    ab.k_d = static_cast<float>(1.0 / (e * e));
    ab.k_h = static_cast<float>(1.0 / e);
  }
  return ab;
}

// What divergence DIV's terms read besides the logits, built on the host from (param_a, param_b). Only
// that: the CUDA kernels take it as a parameter of its own, so that no kernel's parameter block carries
// another divergence's constants (the forward kernels' register counts move with that block's layout).
template <int DIV>
using DivParams = std::conditional_t<DIV == kAlphaBeta, AlphaBetaParams, MixParams>;

template <int DIV>
DivParams<DIV> make_div_params(double param_a, double param_b) {
  if constexpr (DIV == kAlphaBeta) {
    return make_alpha_beta(param_a, param_b);
  } else {
    return make_mix(DIV, static_cast<float>(param_a));
  }
}

// Safe log-add-exp of the mixture in log space: log m = logaddexp(x, y) with
// x = lw_p + log p, y = lw_q + log q. Exact for probabilities far below the
// float range (no underflow of p or q), -inf when both are -inf (no NaN).
// Also returns share_q = w_q q / m in [0, 1], which the skew gradients use.
struct MixLog {
  float log_m, share_q;
};

DK_HD MixLog mix_log(float x, float y) {
  const bool q_larger = !(x > y);
  const float hi = q_larger ? y : x;
  const float lo = q_larger ? x : y;
  const float e = fexp(lo - hi);  // in [0, 1]
  const float one_e = 1.0f + e;
  const bool empty = hi == kNegInf;
  MixLog r;
  r.log_m = empty ? kNegInf : hi + flog_1_2(one_e);
  r.share_q = empty ? 0.0f : (q_larger ? 1.0f : e) / one_e;
  return r;
}

// -- per-element divergence terms ---------------------------------------------
// alpha-beta in form FORM (AlphaBetaParams), from the log-probabilities: the powers p^alpha, q^beta
// are taken in log space, so they do not underflow with p or q. A term weighted by p^alpha = 0
// (resp. q^beta = 0) is 0.
template <int FORM>
DK_HD void alpha_beta_terms(float log_p, float log_q, const AlphaBetaParams& ab, float& d, float& h) {
  if constexpr (FORM == kAbBoth) {
    // d = -(p^a q^b - a/s p^s - b/s q^s) / (a b), h = (q^s - p^a q^b) / a, s = a + b
    const float pq = fexp(ab.alpha * log_p + ab.beta * log_q);
    const float ps = fexp(ab.sum * log_p), qs = fexp(ab.sum * log_q);
    d = (ab.w_p * ps + ab.w_q * qs - pq) * ab.k_d;
    h = (qs - pq) * ab.k_h;
  } else if constexpr (FORM == kAbAlphaOnly) {
    // beta = 0: d = (a p^a (log p - log q) + q^a - p^a) / a^2, h = (q^a - p^a) / a; (1, 0) is forward KL
    const float pa = fexp(ab.alpha * log_p), qa = fexp(ab.alpha * log_q);
    d = (pa > 0.0f ? pa * (log_p - log_q) * ab.k_h : 0.0f) + (qa - pa) * ab.k_d;
    h = (qa - pa) * ab.k_h;
  } else if constexpr (FORM == kAbBetaOnly) {
    // alpha = 0: h = q^b (log q - log p), d = (b h + p^b - q^b) / b^2; (0, 1) is reverse KL
    const float pb = fexp(ab.beta * log_p), qb = fexp(ab.beta * log_q);
    h = qb > 0.0f ? qb * (log_q - log_p) : 0.0f;
    d = h * ab.k_h + (pb - qb) * ab.k_d;
  } else {
    static_assert(always_false<FORM>, "unknown alpha-beta form");
  }
}

// d_j with sum_j d_j = D, and h_j = q_j dD/dq_j (docs/DESIGN.md table). A term
// weighted by p_j = 0 (resp. q_j = 0) is exactly 0: -inf teacher logits never
// give NaN. Reverse-type terms are +inf where q_j > 0 and p_j = 0. FORM: the
// alpha-beta form (0 for the others).
template <int DIV, int FORM = 0>
DK_HD void div_terms(float log_p, float log_q, float p, float q, const DivParams<DIV>& dp, float& d, float& h) {
  if constexpr (DIV == kForwardKL) {
    d = p > 0.0f ? p * (log_p - log_q) : 0.0f;
    h = -p;
  } else if constexpr (DIV == kReverseKL) {
    d = q > 0.0f ? q * (log_q - log_p) : 0.0f;
    h = d;
  } else if constexpr (DIV == kJSD) {
    const MixLog ml = mix_log(dp.lw_p + log_p, dp.lw_q + log_q);
    const float kp = p > 0.0f ? p * (log_p - ml.log_m) : 0.0f;
    const float kq = q > 0.0f ? q * (log_q - ml.log_m) : 0.0f;
    d = dp.w_p * kp + dp.w_q * kq;
    h = dp.w_q * kq;
  } else if constexpr (DIV == kSkewForwardKL) {
    // h = -(1-a) p q / m = -p * share_q
    const MixLog ml = mix_log(dp.lw_p + log_p, dp.lw_q + log_q);
    d = p > 0.0f ? p * (log_p - ml.log_m) : 0.0f;
    h = -p * ml.share_q;
  } else if constexpr (DIV == kSkewReverseKL) {
    // h = q (log q - log m) - a q^2 / m = d - q * share_q
    const MixLog ml = mix_log(dp.lw_p + log_p, dp.lw_q + log_q);
    d = q > 0.0f ? q * (log_q - ml.log_m) : 0.0f;
    h = d - q * ml.share_q;
  } else if constexpr (DIV == kTVD) {
    const float diff = q - p;
    d = 0.5f * (diff < 0.0f ? -diff : diff);
    h = diff > 0.0f ? 0.5f * q : (diff < 0.0f ? -0.5f * q : 0.0f);
  } else if constexpr (DIV == kAlphaBeta) {
    alpha_beta_terms<FORM>(log_p, log_q, dp, d, h);
  } else {
    static_assert(always_false<DIV>, "div_terms: a divergence id without terms (distillkit/core/divergences.py)");
  }
}

// dD/db_k = h_k - q_k c. For forward KL (h = -p, c = -1) this is q - p, written
// without the cancellation and without reading c. For reverse KL, h_k = q_k rel_k with
// rel = ((s - m_s) - (t - ref)) / T, taken by the caller, and c = E_q[rel] (kl_move): both
// small near the mode, so q (rel - c) cancels nothing of the size of the logits.
template <int DIV, int FORM = 0>
DK_HD float div_grad(float log_p, float log_q, float p, float q, float rel, float c, const DivParams<DIV>& dp) {
  if constexpr (DIV == kForwardKL) {
    return q - p;
  } else if constexpr (DIV == kReverseKL) {
    return q == 0.0f ? 0.0f : q * (rel - c);
  } else {
    float d, h;
    div_terms<DIV, FORM>(log_p, log_q, p, q, dp, d, h);
    return h - q * c;
  }
}

// -- cross-entropy ------------------------------------------------------------
// A label takes part in CE when it is not ignore_index and lies in [0, V);
// otherwise ce = 0 and its gradient is 0, and the label is never dereferenced.
DK_HD bool label_valid(int64_t y, int64_t vocab, int64_t ignore_index) {
  return y != ignore_index && y >= 0 && y < vocab;
}

}  // namespace distillkit
