"""Per-element math of the divergences in the Triton kernels: the divergence ids, probabilities from a row's
saved statistics, and each two-pass divergence's terms (d_j, h_j) in base 2 (kernels/distill.py has the row math
and the kernels that call these). Adding a divergence adds its id and its branch of `_divergence_terms` here.

The two-pass divergences work in base 2: log2 p and log2 q are an FADD and an FFMA from the logits, the terms
are scaled to nats by ln 2 once, ratios such as q / m are exp2 of a log difference (no division), and the one
per-element log (of the mixture m) is the exponent of m plus the log of its mantissa in [1, 2): lg2.approx.ftz
(one MUFU.LG2) compiled, with an absolute error there of at most 2**-22, instead of a ~28-instruction accurate
log.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Divergence ids (constexpr switch): distillkit/core/divergences.py, checked by tests/core/test_divergence_registry.py.
NONE = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
REVERSE_KL = tl.constexpr(2)
JSD = tl.constexpr(3)
SKEW_FORWARD_KL = tl.constexpr(4)
SKEW_REVERSE_KL = tl.constexpr(5)
TVD = tl.constexpr(6)
ALPHA_BETA = tl.constexpr(7)

# A lane's initial max: finite, so no step needs a guard against -inf - -inf (an empty row's max is -inf again).
LOWEST = tl.constexpr(-3.4028234663852886e38)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)
# Compiled kernels take the per-element log of a mixture as lg2.approx.ftz on [1, 2) (_log2_mixture; its effect on
# the divergences: tests/core/test_fast_log2_tolerance.py). The switch is Triton's own (`triton.jit` returns an
# interpreted function when it is set), so the two always agree.
COMPILED = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def _log2_probs(x, m, ls, scale):
    """(log2 softmax(x / T), softmax(x / T)) from a row's saved raw max m and log-sum ls (natural), scale =
    log2(e) / T: one FADD and one FFMA before the exp2 (ex2.approx.ftz: no range-check instructions; an output
    below 2**-126 is 0, never stored anyway)."""
    log2_p = (x - m) * scale - ls * LOG2E
    return log2_p, tl.exp2(log2_p)


@triton.jit
def _log2_mixture(p, q, w_p, w_q):
    """log2(w_p p + w_q q) as exponent + log2(mantissa): the per-element log (lg2.approx.ftz compiled, one MUFU.LG2)
    only ever sees [1, 2), where its error is absolute (<= 2**-22, CUDA's __log2f) rather than 2 ulp of a large
    result; the interpreter runs no extern call and takes tl.log2. The mixture is raised to the smallest normal
    first (its exponent field is read as is), which only moves terms weighted by a probability of 0."""
    bits = tl.maximum(w_p * p + w_q * q, SMALLEST_NORMAL).to(tl.int32, bitcast=True)
    # the biased exponent e as the float 2**23 + e, less 2**23 + 127: exact, and no int-to-float conversion
    exponent = ((bits >> 23) | 0x4B000000).to(tl.float32, bitcast=True) - 8388735.0
    mantissa = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    if COMPILED:
        return exponent + libdevice.fast_log2f(mantissa)
    else:
        return exponent + tl.log2(mantissa)


@triton.jit
def _weighted_log_ratio(x, lg_x, lg_m):
    """x log2(x / m), 0 where x = 0: a -inf log2 x (a -inf logit) is raised to the lowest float rather than
    selected away (one FMNMX, not a compare and a select), as log2 m >= -126 is finite."""
    return x * tl.maximum(lg_x - lg_m, LOWEST)


@triton.jit
def _divergence_terms(lg_p, lg_q, p, q, param_a, param_b, DIVERGENCE: tl.constexpr):
    """Per-element (d_j, h_j), in nats, of a two-pass divergence from lg_p = log2 p_j, lg_q = log2 q_j: sum_j d_j = D
    and h_j = q_j * dD/dq_j; 0 where the weighting probability is 0 (a masked or -inf logit included). (param_a,
    param_b) are the divergence's parameters (distillkit/core/divergences.py: beta, skew, (alpha, beta)). Ratios
    q / m are exp2(lg_q - lg_m): no division."""
    if DIVERGENCE == JSD:
        # param_a = beta, m = beta p + (1 - beta) q
        lg_m = _log2_mixture(p, q, param_a, 1.0 - param_a)
        kl_q = _weighted_log_ratio(q, lg_q, lg_m) * ((1.0 - param_a) * LN2)
        d = _weighted_log_ratio(p, lg_p, lg_m) * (param_a * LN2) + kl_q
        h = kl_q
    elif DIVERGENCE == SKEW_FORWARD_KL:
        # param_a = skew, m = skew p + (1 - skew) q; q / m <= 1 / (1 - skew)
        lg_m = _log2_mixture(p, q, param_a, 1.0 - param_a)
        d = _weighted_log_ratio(p, lg_p, lg_m) * LN2
        h = -(1.0 - param_a) * p * tl.exp2(lg_q - lg_m)
    elif DIVERGENCE == SKEW_REVERSE_KL:
        # param_a = skew, m = (1 - skew) p + skew q; q / m <= 2**126 (m raised to a normal), weighted by skew
        lg_m = _log2_mixture(p, q, 1.0 - param_a, param_a)
        d = _weighted_log_ratio(q, lg_q, lg_m) * LN2
        h = d - param_a * q * tl.exp2(lg_q - lg_m)
    elif DIVERGENCE == TVD:
        diff = q - p
        d = 0.5 * tl.abs(diff)
        h = 0.5 * q * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif DIVERGENCE == ALPHA_BETA:
        d, h = _alpha_beta_terms(lg_p, lg_q, p, q, param_a, param_b)
    else:
        tl.static_assert(False, "unknown divergence id, or not a two-pass one (distillkit/core/divergences.py)")
    return d, h


@triton.jit
def _alpha_beta_terms(lg_p, lg_q, p, q, alpha, beta):
    """alpha-beta divergence, D = -1/(alpha beta) sum (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)), with
    h = q dD/dq = (q^(a+b) - p^a q^b) / alpha; the limits beta = 0 (alpha = 1: forward KL) and alpha = 0 (beta = 1:
    reverse KL) have their own terms (Cichocki et al.). The three are one form, so the loop holds one path: with
    e1 = p^a q^b, e2 = p^(a+b), e3 = q^(a+b) (exp2(x log2 p): 0 for p = 0) and y = e1 log2(p / q) (in the limits
    e1 is p^a or q^b), d and h are sums of them with per-row coefficients (y's is 0 outside the limits)."""
    is_kl = beta == 0.0  # the forward-KL limit
    is_rkl = alpha == 0.0  # the reverse-KL limit
    total = alpha + beta
    # the logs raised to a finite floor in e1 only: a zero exponent times log2 0 = -inf would be NaN
    e1 = tl.exp2(alpha * tl.maximum(lg_p, LOWEST) + beta * tl.maximum(lg_q, LOWEST))
    e2 = tl.exp2(total * lg_p)
    e3 = tl.exp2(total * lg_q)
    # e1 > 0 has p > 0 and q > 0 (general: y finite, weighted 0) or the limit's weighting probability > 0
    y = tl.where(e1 > 0, e1 * (lg_p - lg_q), 0.0)
    # beta = 0: d = (e3 - e1) / a^2 + ln2 y / a, h = (e3 - e1) / a; alpha = 0: d = (e2 - e1) / b^2 - ln2 y / b,
    # h = -ln2 y; otherwise d = -(e1 - a/(a+b) e2 - b/(a+b) e3) / (a b), h = (e3 - e1) / a.
    inv_a = 1.0 / tl.where(is_rkl, 1.0, alpha)
    inv_b = 1.0 / tl.where(is_kl, 1.0, beta)
    k1 = tl.where(is_kl, -inv_a * inv_a, tl.where(is_rkl, -inv_b * inv_b, -inv_a * inv_b))
    k2 = tl.where(is_kl, 0.0, tl.where(is_rkl, inv_b * inv_b, inv_b / total))
    k3 = tl.where(is_kl, inv_a * inv_a, tl.where(is_rkl, 0.0, inv_a / total))
    k_y = tl.where(is_kl, LN2 * inv_a, tl.where(is_rkl, -LN2 * inv_b, 0.0))
    u = tl.where(is_rkl, 0.0, inv_a)
    d = k1 * e1 + k2 * e2 + k3 * e3 + k_y * y
    h = u * (e3 - e1) + tl.where(is_rkl, -LN2, 0.0) * y
    return d, h
