"""The op's contract in chunked PyTorch: the backend for CPU tensors without the
compiled extension, and an independent second implementation of the row math.

Rows are processed in chunks so that the fp32 temporaries stay near
CHUNK_BYTES however large the batch is.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import DIVERGENCE_IDS
from ._rows import row_outputs

CHUNK_BYTES = 64 * 2**20
_ID = DIVERGENCE_IDS


def divergence_terms(log_p, log_q, p, q, mix: float, divergence: int):
    """Per-element (d, h) with sum(d) = D and h = q * dD/dq (docs/DESIGN.md)."""
    zero = torch.zeros((), dtype=q.dtype, device=q.device)

    def safe_log(m):
        return torch.log(torch.where(m > 0, m, 1.0))

    if divergence == _ID["forward_kl"]:
        return torch.where(p > 0, p * (log_p - log_q), zero), -p
    if divergence == _ID["reverse_kl"]:
        d = torch.where(q > 0, q * (log_q - log_p), zero)
        return d, d
    if divergence == _ID["jsd"]:
        log_m = safe_log(mix * p + (1 - mix) * q)
        kl_q = torch.where(q > 0, q * (log_q - log_m), zero)
        return mix * torch.where(p > 0, p * (log_p - log_m), zero) + (1 - mix) * kl_q, (1 - mix) * kl_q
    if divergence == _ID["skew_forward_kl"]:
        m = mix * p + (1 - mix) * q
        m_safe = torch.where(m > 0, m, 1.0)
        return torch.where(p > 0, p * (log_p - m_safe.log()), zero), torch.where(m > 0, -(1 - mix) * p * q / m_safe, zero)
    if divergence == _ID["skew_reverse_kl"]:
        m = (1 - mix) * p + mix * q
        m_safe = torch.where(m > 0, m, 1.0)
        d = torch.where(q > 0, q * (log_q - m_safe.log()), zero)
        return d, d - torch.where(m > 0, mix * q * q / m_safe, zero)
    if divergence == _ID["tvd"]:
        return 0.5 * (q - p).abs(), 0.5 * q * torch.sign(q - p)
    raise ValueError(f"unknown divergence id {divergence}")


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_BYTES // (4 * max(vocab, 1) * 6))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _valid(labels, vocab, ignore_index):
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def forward(student: torch.Tensor, teacher: Optional[torch.Tensor], labels: Optional[torch.Tensor],
            divergence: int, mix: float, temperature: float, ignore_index: int, with_ce: bool,
            div_vocab: int):
    div, ce, stats = row_outputs(student)
    vocab = student.shape[-1]
    s2 = student.reshape(-1, vocab)
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :div_vocab] if divergence != 0 else None
    y = labels.reshape(-1) if with_ce else None
    div2, ce2, stats2 = div.view(-1), ce.view(-1), stats.view(-1, 4)
    stats2.zero_()
    div2.zero_()
    ce2.zero_()
    for rows in _chunks(s2.shape[0], vocab):
        s = s2[rows].float()
        if divergence != 0:
            a = t2[rows].float() / temperature
            b = s[:, :div_vocab] / temperature
            lse_a, lse_b = a.logsumexp(-1), b.logsumexp(-1)
            log_p, log_q = a - lse_a[:, None], b - lse_b[:, None]
            d, h = divergence_terms(log_p, log_q, log_p.exp(), log_q.exp(), mix, divergence)
            div2[rows] = d.sum(-1)
            stats2[rows, 0], stats2[rows, 1] = lse_a, lse_b
            stats2[rows, 2] = h.sum(-1)
        if with_ce:
            lse_s = s.logsumexp(-1)
            valid = _valid(y[rows], vocab, ignore_index)
            target = s.gather(-1, torch.where(valid, y[rows], 0).long()[:, None]).squeeze(-1)
            ce2[rows] = torch.where(valid, lse_s - target, 0.0)
            stats2[rows, 3] = lse_s
    return div, ce, stats


def backward(grad_div: torch.Tensor, grad_ce: torch.Tensor, student: torch.Tensor,
             teacher: Optional[torch.Tensor], labels: Optional[torch.Tensor], stats: torch.Tensor,
             divergence: int, mix: float, temperature: float, ignore_index: int, with_ce: bool,
             div_vocab: int):
    vocab = student.shape[-1]
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    g2, s2 = grad.view(-1, vocab), student.reshape(-1, vocab)
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :div_vocab] if divergence != 0 else None
    st2 = stats.reshape(-1, 4).float()
    gd, gc = grad_div.reshape(-1).float(), grad_ce.reshape(-1).float()
    for rows in _chunks(s2.shape[0], vocab):
        s = s2[rows].float()
        out = torch.zeros_like(s)
        if divergence != 0:
            a = t2[rows].float() / temperature
            log_p = a - st2[rows, 0:1]
            log_q = s[:, :div_vocab] / temperature - st2[rows, 1:2]
            p, q = log_p.exp(), log_q.exp()
            _, h = divergence_terms(log_p, log_q, p, q, mix, divergence)
            d_db = h - q * st2[rows, 2:3]
            # where, not multiply: a row weighted out of the divergence may have an infinite one.
            out[:, :div_vocab] += torch.where(gd[rows, None] != 0, (gd[rows, None] / temperature) * d_db, 0.0)
        if with_ce:
            y = labels.reshape(-1)[rows]
            valid = _valid(y, vocab, ignore_index)
            onehot = torch.zeros_like(s)
            onehot.scatter_(-1, torch.where(valid, y, 0).long()[:, None], valid.float()[:, None])
            # ce is the constant 0 on an ignored label: no gradient, whatever grad_ce says.
            g_ce = torch.where(valid, gc[rows], 0.0)[:, None]
            out += g_ce * ((s - st2[rows, 3:4]).exp() - onehot)
        g2[rows] = out.to(grad.dtype)
    return grad
