"""The top-k op in chunked PyTorch: the backend for CPU tensors, and a second implementation of
kernels/topk.py's row math."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .tails import REST_FLOOR, Tail, tail_from_id

CHUNK_BYTES = 64 * 2**20  # fp32 temporaries of the torch backend per chunk of rows


# -- torch backend -----------------------------------------------------------------------------------

def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_BYTES // (4 * max(vocab, 1) * 4))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _gather_scaled(s: Tensor, ids: Tensor, temperature: float):
    """(present, safe ids, g = s[ids] / T with -inf where absent) for fp32 logits s [c, V]."""
    present = (ids >= 0) & (ids < s.shape[-1])
    safe_ids = torch.where(present, ids, 0)
    return present, safe_ids, torch.where(present, s.gather(-1, safe_ids) / temperature, -math.inf)


def _student_log_probs(g: Tensor, lse_norm: Tensor, tail: Tail) -> Tensor:
    """lq [c, K] at the ids. The full softmax's normalizer is used as it is: a row with no distribution
    (all -inf, NaN, +inf) gives NaN, as the reference's log_softmax does."""
    return g - (lse_norm if tail.full_softmax else torch.where(torch.isfinite(lse_norm), lse_norm, 0.0))[:, None]


def _teacher_mass(lp: Tensor) -> Tensor:
    """sum_k p_k over the present ids (1, or 0 for a teacher with no finite log-probability)."""
    p = lp.exp()
    return torch.where(p > 0, p, 0.0).sum(-1)


def _student_stats(s: Tensor, ids: Tensor, lp: Tensor, temperature: float, tail: Tail):
    """(lq [c, K], lse_norm [c], tail_stat [c]) for fp32 logits s [c, V]; tail_stat is the student's log
    rest mass with a rest category, else the teacher's mass P on the ids (the forward-KL gradient is
    q P - p: exactly 0 for a teacher row without any finite log-probability)."""
    _, _, g = _gather_scaled(s, ids, temperature)
    tail_stat = _teacher_mass(lp)
    if tail.full_softmax:
        b = s / temperature
        m = b.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        z = (b - m).exp().sum(-1)
        lse_norm = m[:, 0] + z.log()
        if tail.rest_category:
            z_k = (g - m).exp().sum(-1)
            tail_stat = ((z - z_k) / z).clamp_min(REST_FLOOR).log()
    else:
        lse_norm = g.logsumexp(-1)
    return _student_log_probs(g, lse_norm, tail), lse_norm, tail_stat


def _torch_forward(student, ids, tlp, trest, labels, divergence, tail_id, temperature, ignore_index, with_ce):
    tail = tail_from_id(tail_id, divergence)
    vocab, k = student.shape[-1], ids.shape[-1]
    lead = student.shape[:-1]
    s2, ids2, tlp2 = student.reshape(-1, vocab), ids.reshape(-1, k).long(), tlp.reshape(-1, k)
    n = s2.shape[0]
    div, ce = torch.zeros(n, device=student.device), torch.zeros(n, device=student.device)
    stats = torch.zeros(n, 4, device=student.device)
    for rows in _chunks(n, vocab):
        s = s2[rows].float()
        if divergence:
            lp = tlp2[rows]
            lq, lse_norm, tail_stat = _student_stats(s, ids2[rows], lp, temperature, tail)
            q = lq.exp()
            if divergence == 1:
                d = torch.where(lp > -math.inf, lp.exp() * (lp - lq), 0.0).sum(-1)
            else:
                d = torch.where(q > 0, q * (lq - lp), 0.0).sum(-1)
            if tail.rest_category:
                lp_r, lq_rest = trest.reshape(-1)[rows], tail_stat
                if divergence == 1:
                    d = d + torch.where(lp_r > -math.inf, lp_r.exp() * (lp_r - lq_rest), 0.0)
                else:
                    d = d + torch.where(lq_rest > -math.inf, lq_rest.exp() * (lq_rest - lp_r), 0.0)
            div[rows] = d
            stats[rows, 0], stats[rows, 1], stats[rows, 2] = lse_norm, tail_stat, d
        if with_ce:
            y = labels.reshape(-1)[rows]
            lse_s = s.logsumexp(-1)
            valid = (y != ignore_index) & (y >= 0) & (y < vocab)
            target = s.gather(-1, torch.where(valid, y, 0).long()[:, None])[:, 0]
            ce[rows] = torch.where(valid, lse_s - target, 0.0)
            stats[rows, 3] = lse_s
    return div.view(lead), ce.view(lead), stats.view(*lead, 4)


def _torch_backward(grad_div, grad_ce, student, ids, tlp, trest, labels, stats, divergence, tail_id,
                    temperature, ignore_index, with_ce):
    tail = tail_from_id(tail_id, divergence)
    vocab, k = student.shape[-1], ids.shape[-1]
    s2, ids2, tlp2 = student.reshape(-1, vocab), ids.reshape(-1, k).long(), tlp.reshape(-1, k)
    st, gd, gc = stats.reshape(-1, 4), grad_div.reshape(-1).float(), grad_ce.reshape(-1).float()
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    g2 = grad.view(-1, vocab)
    for rows in _chunks(s2.shape[0], vocab):
        s = s2[rows].float()
        out = torch.zeros_like(s)
        if divergence:
            lse_norm, tail_stat, d = st[rows, 0], st[rows, 1], st[rows, 2]
            present, safe, g = _gather_scaled(s, ids2[rows], temperature)
            lq = _student_log_probs(g, lse_norm, tail)
            q, lp = lq.exp(), tlp2[rows]
            if divergence != 1:
                d_db_k = torch.where(q > 0, q * (lq - lp - d[:, None]), 0.0)
            elif tail.rest_category:  # the categories' teacher mass P + p_rest is 1
                d_db_k = q - lp.exp()
            else:
                d_db_k = q * tail_stat[:, None] - lp.exp()
            # One spare column takes the absent ids' writes.
            d_db = torch.zeros(s.shape[0], vocab + 1, device=s.device)
            if tail.full_softmax:  # every token moves the full softmax: dD/db_j = q_j * coef
                q_all = (s / temperature - lse_norm[:, None]).exp()
                if tail.rest_category:
                    lp_r, lq_rest = trest.reshape(-1)[rows], tail_stat
                    if divergence == 1:
                        coef = 1.0 - torch.where(lp_r > -math.inf, (lp_r - lq_rest).exp(), 0.0)
                    else:
                        coef = torch.where(lq_rest > -math.inf, lq_rest - lp_r - d, 0.0)
                    d_db[:, :vocab] = torch.where(q_all > 0, coef[:, None] * q_all, 0.0)
                else:  # coef = P, finite or NaN: no guard, so a NaN row stays NaN everywhere (as the reference)
                    d_db[:, :vocab] = tail_stat[:, None] * q_all
            d_db.scatter_(-1, torch.where(present, safe, vocab), d_db_k)
            gdr = gd[rows, None]
            out += torch.where(gdr != 0, (gdr / temperature) * d_db[:, :vocab], 0.0)
        if with_ce:
            y = labels.reshape(-1)[rows]
            valid = (y != ignore_index) & (y >= 0) & (y < vocab)
            onehot = torch.zeros_like(s).scatter_(-1, torch.where(valid, y, 0).long()[:, None],
                                                  valid.float()[:, None])
            out += torch.where(valid, gc[rows], 0.0)[:, None] * ((s - st[rows, 3:4]).exp() - onehot)
        g2[rows] = out.to(grad.dtype)
    return grad
