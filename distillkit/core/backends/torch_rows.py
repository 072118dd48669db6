"""The op's contract in chunked PyTorch: the backend for CPU tensors without the
compiled extension, and an independent second implementation of the row math.

Rows are processed in chunks so that the fp32 temporaries stay near
CHUNK_BYTES however large the batch is.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..divergences import IDS as _ID
from ._rows import (NUM_STATS, STAT_C, STAT_LS_1, STAT_LS_A, STAT_LS_B, STAT_M_1, STAT_M_S, STAT_M_T, STAT_REF,
                    flush_subnormals, row_outputs)

CHUNK_BYTES = 64 * 2**20


def divergence_terms(log_p, log_q, p, q, param_a: float, param_b: float, divergence: int):
    """Per-element (d, h) with sum(d) = D and h = q * dD/dq (docs/DESIGN.md); (param_a, param_b) from
    distillkit/core/divergences.py (jsd: beta; skew: skew; alpha_beta: (alpha, beta))."""
    zero = torch.zeros((), dtype=q.dtype, device=q.device)

    def safe_log(m):
        return torch.log(torch.where(m > 0, m, 1.0))

    if divergence == _ID["forward_kl"]:
        return torch.where(p > 0, p * (log_p - log_q), zero), -p
    if divergence == _ID["reverse_kl"]:
        d = torch.where(q > 0, q * (log_q - log_p), zero)
        return d, d
    if divergence == _ID["jsd"]:
        beta = param_a
        log_m = safe_log(beta * p + (1 - beta) * q)
        kl_q = torch.where(q > 0, q * (log_q - log_m), zero)
        return beta * torch.where(p > 0, p * (log_p - log_m), zero) + (1 - beta) * kl_q, (1 - beta) * kl_q
    if divergence == _ID["skew_forward_kl"]:
        m = param_a * p + (1 - param_a) * q
        m_safe = torch.where(m > 0, m, 1.0)
        return (torch.where(p > 0, p * (log_p - m_safe.log()), zero),
                torch.where(m > 0, -(1 - param_a) * p * q / m_safe, zero))
    if divergence == _ID["skew_reverse_kl"]:
        m = (1 - param_a) * p + param_a * q
        m_safe = torch.where(m > 0, m, 1.0)
        d = torch.where(q > 0, q * (log_q - m_safe.log()), zero)
        return d, d - torch.where(m > 0, param_a * q * q / m_safe, zero)
    if divergence == _ID["tvd"]:
        return 0.5 * (q - p).abs(), 0.5 * q * torch.sign(q - p)
    if divergence == _ID["alpha_beta"]:
        return _alpha_beta_terms(log_p, log_q, p, q, param_a, param_b)
    raise ValueError(f"unknown divergence id {divergence} (distillkit/core/divergences.py)")


def _alpha_beta_terms(log_p, log_q, p, q, alpha: float, beta: float):
    """D = -1/(a b) sum (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)), h = (q^(a+b) - p^a q^b) / a; powers as
    exp(x log p) (0 at p = 0); beta = 0 and alpha = 0 are the limits (forward KL at (1, 0), reverse at (0, 1))."""
    if beta == 0.0:
        p_a, q_a = (alpha * log_p).exp(), (alpha * log_q).exp()
        d = (torch.where(p > 0, alpha * p_a * (log_p - log_q), 0.0) + (q_a - p_a)) / (alpha * alpha)
        return d, (q_a - p_a) / alpha
    if alpha == 0.0:
        p_b, q_b = (beta * log_p).exp(), (beta * log_q).exp()
        kl = torch.where(q > 0, q_b * (log_q - log_p), 0.0)
        return (beta * kl + (p_b - q_b)) / (beta * beta), kl
    total = alpha + beta
    p_a_q_b = (alpha * log_p + beta * log_q).exp()
    p_s, q_s = (total * log_p).exp(), (total * log_q).exp()
    d = -(p_a_q_b - (alpha / total) * p_s - (beta / total) * q_s) / (alpha * beta)
    return d, (q_s - p_a_q_b) / alpha


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_BYTES // (4 * max(vocab, 1) * 6))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _valid(labels, vocab, ignore_index):
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def _max_and_logsum(x: torch.Tensor, inv_t: float):
    """Per row the raw max m and log sum exp((x - m) / T), kept apart so that exp((x - m) / T - ls) is
    exact however large |x| is. m = -inf (no finite entry) gives ls = -inf; NaN and +inf give NaN."""
    m = x.amax(-1)
    ref = torch.where(m == float("-inf"), 0.0, m)
    return m, (((x - ref[:, None]) * inv_t).exp().sum(-1)).log()


def _defined(m: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    return m.isfinite() & ls.isfinite()


def _log_probs(x: torch.Tensor, m: torch.Tensor, ls: torch.Tensor, inv_t: float):
    """((x - m) / T, log softmax(x / T)) from a row's saved (m, ls): subtract, then scale (docs/DESIGN.md)."""
    rel = (x - m[:, None]) * inv_t
    return rel, rel - ls[:, None]


def _at_argmax(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per row y at x's argmax: the reference of the reverse-KL terms (0 where y is -inf there, so the
    arithmetic stays finite and the +inf term gives the +inf divergence)."""
    ref = y.gather(-1, x.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(ref == float("-inf"), 0.0, ref)


def _rel_terms(x, m_x, y, ref, inv_t: float):
    """((x - m_x) - (y - ref)) / T per element: exactly 0 at x's mode."""
    return ((x - m_x[:, None]) - (y - ref[:, None])) * inv_t


def divergence_grad(s_div: torch.Tensor, t: torch.Tensor, st: torch.Tensor, param_a: float, param_b: float,
                    divergence: int,
                    inv_t: float) -> torch.Tensor:
    """dD/db for a chunk of rows (student s_div and teacher t over the divergence ids, fp32) from their
    stats [rows, NUM_STATS]; NaN on a row with no distribution (c = NaN), whatever the guards below say.
    Shared by this backend's backward and the vocabulary-parallel shard backward (global stats)."""
    _, log_p = _log_probs(t, st[:, STAT_M_T], st[:, STAT_LS_A], inv_t)
    _, log_q = _log_probs(s_div, st[:, STAT_M_S], st[:, STAT_LS_B], inv_t)
    p, q = log_p.exp(), log_q.exp()
    c = st[:, STAT_C, None]
    if divergence == _ID["forward_kl"]:
        d_db = q - p  # h - q c with h = -p, c = -1, without the cancellation
    elif divergence == _ID["reverse_kl"]:
        rel = _rel_terms(s_div, st[:, STAT_M_S], t, st[:, STAT_REF], inv_t)
        d_db = torch.where(q > 0, q * (rel - c), 0.0)
    else:
        d_db = divergence_terms(log_p, log_q, p, q, param_a, param_b, divergence)[1] - q * c
    return torch.where(c.isnan(), float("nan"), d_db)


def softmax_at_1(s: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
    """softmax(s) of a chunk of rows from their saved raw max and log-sum at T = 1."""
    return _log_probs(s, st[:, STAT_M_1], st[:, STAT_LS_1], 1.0)[1].exp()


def forward(student: torch.Tensor, teacher: Optional[torch.Tensor], labels: Optional[torch.Tensor],
            divergence: int, param_a: float, param_b: float, temperature: float, ignore_index: int, with_ce: bool,
            div_vocab: int):
    div, ce, stats = row_outputs(student)
    vocab = student.shape[-1]
    inv_t = 1.0 / temperature
    s2 = student.reshape(-1, vocab)
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :div_vocab] if divergence != 0 else None
    y = labels.reshape(-1) if with_ce else None
    div2, ce2, stats2 = div.view(-1), ce.view(-1), stats.view(-1, NUM_STATS)
    stats2.zero_()
    div2.zero_()
    ce2.zero_()
    for rows in _chunks(s2.shape[0], vocab):
        s = s2[rows].float()
        if divergence != 0:
            t, sd = t2[rows].float(), s[:, :div_vocab]
            m_t, ls_a = _max_and_logsum(t, inv_t)
            m_s, ls_b = _max_and_logsum(sd, inv_t)
            _, log_p = _log_probs(t, m_t, ls_a, inv_t)
            _, log_q = _log_probs(sd, m_s, ls_b, inv_t)
            p, q = log_p.exp(), log_q.exp()
            d, h = divergence_terms(log_p, log_q, p, q, param_a, param_b, divergence)
            if divergence == _ID["reverse_kl"]:
                # c = E_q[(s - m_s) - (t - ref)] / T with ref = t at the student's argmax: 0 at the mode,
                # so no term of the size of the logits cancels in the backward's q (term - c).
                ref = _at_argmax(t, sd)
                h = torch.where(q > 0, q * _rel_terms(sd, m_s, t, ref, inv_t), 0.0)
                stats2[rows, STAT_REF] = ref
            # A row that defines no distribution (NaN, +inf, nothing finite) has no divergence.
            undefined = ~(_defined(m_t, ls_a) & _defined(m_s, ls_b))
            div2[rows] = torch.where(undefined, float("nan"), d.sum(-1))
            stats2[rows, STAT_M_T], stats2[rows, STAT_LS_A] = m_t, ls_a
            stats2[rows, STAT_M_S], stats2[rows, STAT_LS_B] = m_s, ls_b
            stats2[rows, STAT_C] = torch.where(undefined, float("nan"), h.sum(-1))
        if with_ce:
            m_1, ls_1 = _max_and_logsum(s, 1.0)
            valid = _valid(y[rows], vocab, ignore_index)
            target = s.gather(-1, torch.where(valid, y[rows], 0).long()[:, None]).squeeze(-1)
            ce_row = torch.where(_defined(m_1, ls_1), (m_1 - target) + ls_1, float("nan"))
            ce2[rows] = torch.where(valid, ce_row, 0.0)
            stats2[rows, STAT_M_1], stats2[rows, STAT_LS_1] = m_1, ls_1
    return div, ce, stats


def backward(grad_div: torch.Tensor, grad_ce: torch.Tensor, student: torch.Tensor,
             teacher: Optional[torch.Tensor], labels: Optional[torch.Tensor], stats: torch.Tensor,
             divergence: int, param_a: float, param_b: float, temperature: float, ignore_index: int, with_ce: bool,
             div_vocab: int):
    vocab = student.shape[-1]
    inv_t = 1.0 / temperature
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    g2, s2 = grad.view(-1, vocab), student.reshape(-1, vocab)
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :div_vocab] if divergence != 0 else None
    st2 = stats.reshape(-1, NUM_STATS).float()
    gd, gc = grad_div.reshape(-1).float(), grad_ce.reshape(-1).float()
    for rows in _chunks(s2.shape[0], vocab):
        s = s2[rows].float()
        st = st2[rows]
        out = torch.zeros_like(s)
        if divergence != 0:
            d_db = divergence_grad(s[:, :div_vocab], t2[rows].float(), st, param_a, param_b, divergence, inv_t)
            # where, not multiply: a row weighted out of the divergence may have a NaN or infinite one.
            out[:, :div_vocab] += torch.where(gd[rows, None] != 0, (gd[rows, None] * inv_t) * d_db, 0.0)
        if with_ce:
            y = labels.reshape(-1)[rows]
            valid = _valid(y, vocab, ignore_index)
            onehot = torch.zeros_like(s)
            onehot.scatter_(-1, torch.where(valid, y, 0).long()[:, None], valid.float()[:, None])
            # ce is the constant 0 on an ignored label: no gradient, whatever grad_ce says.
            g_ce = torch.where(valid, gc[rows], 0.0)[:, None]
            out += torch.where(g_ce != 0, g_ce * (softmax_at_1(s, st) - onehot), 0.0)
        # No subnormal leaves the op: GEMMs that consume the gradient run ~10x slower on them (x86).
        g2[rows] = flush_subnormals(out).to(grad.dtype)
    return grad
