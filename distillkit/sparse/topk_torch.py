"""The top-k op in chunked PyTorch: the backend for CPU tensors, and a second implementation of
kernels/topk.py's row math."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import REST_FLOOR

CHUNK_BYTES = 64 * 2**20  # fp32 temporaries of the torch backend per chunk of rows


# -- torch backend -----------------------------------------------------------------------------------

def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_BYTES // (4 * max(vocab, 1) * 4))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _student_stats(s: Tensor, ids: Tensor, temperature: float, bucket: bool):
    """(present, ids clamped, lq [c, K], lse_norm [c], lq_rest [c]) for fp32 logits s [c, V]."""
    vocab = s.shape[-1]
    present = (ids >= 0) & (ids < vocab)
    safe_ids = torch.where(present, ids, 0)
    g = torch.where(present, s.gather(-1, safe_ids) / temperature, -math.inf)
    if bucket:
        b = s / temperature
        m = b.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        z = (b - m).exp().sum(-1)
        z_k = (g - m).exp().sum(-1)
        lse_norm = m[:, 0] + z.log()
        lq_rest = ((z - z_k) / z).clamp_min(REST_FLOOR).log()
    else:
        lse_norm = g.logsumexp(-1)
        lq_rest = torch.zeros_like(lse_norm)
    lq = g - torch.where(torch.isfinite(lse_norm), lse_norm, 0.0)[:, None]
    return present, safe_ids, lq, lse_norm, lq_rest


def _torch_forward(student, ids, tlp, trest, labels, divergence, bucket, temperature, ignore_index, with_ce):
    vocab, k = student.shape[-1], ids.shape[-1]
    lead = student.shape[:-1]
    s2, ids2, tlp2 = student.reshape(-1, vocab), ids.reshape(-1, k).long(), tlp.reshape(-1, k)
    n = s2.shape[0]
    div, ce = torch.zeros(n, device=student.device), torch.zeros(n, device=student.device)
    stats = torch.zeros(n, 4, device=student.device)
    for rows in _chunks(n, vocab):
        s = s2[rows].float()
        if divergence:
            _, _, lq, lse_norm, lq_rest = _student_stats(s, ids2[rows], temperature, bucket)
            lp, q = tlp2[rows], lq.exp()
            if divergence == 1:
                d = torch.where(lp > -math.inf, lp.exp() * (lp - lq), 0.0).sum(-1)
            else:
                d = torch.where(q > 0, q * (lq - lp), 0.0).sum(-1)
            if bucket:
                lp_r = trest.reshape(-1)[rows]
                if divergence == 1:
                    d = d + torch.where(lp_r > -math.inf, lp_r.exp() * (lp_r - lq_rest), 0.0)
                else:
                    d = d + torch.where(lq_rest > -math.inf, lq_rest.exp() * (lq_rest - lp_r), 0.0)
            div[rows] = d
            stats[rows, 0], stats[rows, 1], stats[rows, 2] = lse_norm, lq_rest, d
        if with_ce:
            y = labels.reshape(-1)[rows]
            lse_s = s.logsumexp(-1)
            valid = (y != ignore_index) & (y >= 0) & (y < vocab)
            target = s.gather(-1, torch.where(valid, y, 0).long()[:, None])[:, 0]
            ce[rows] = torch.where(valid, lse_s - target, 0.0)
            stats[rows, 3] = lse_s
    return div.view(lead), ce.view(lead), stats.view(*lead, 4)


def _torch_backward(grad_div, grad_ce, student, ids, tlp, trest, labels, stats, divergence, bucket,
                    temperature, ignore_index, with_ce):
    vocab, k = student.shape[-1], ids.shape[-1]
    s2, ids2, tlp2 = student.reshape(-1, vocab), ids.reshape(-1, k).long(), tlp.reshape(-1, k)
    st, gd, gc = stats.reshape(-1, 4), grad_div.reshape(-1).float(), grad_ce.reshape(-1).float()
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    g2 = grad.view(-1, vocab)
    for rows in _chunks(s2.shape[0], vocab):
        s = s2[rows].float()
        out = torch.zeros_like(s)
        if divergence:
            lse_norm, lq_rest, d = st[rows, 0], st[rows, 1], st[rows, 2]
            present = (ids2[rows] >= 0) & (ids2[rows] < vocab)
            safe = torch.where(present, ids2[rows], 0)
            g = torch.where(present, s.gather(-1, safe) / temperature, -math.inf)
            lq = g - torch.where(torch.isfinite(lse_norm), lse_norm, 0.0)[:, None]
            q, lp = lq.exp(), tlp2[rows]
            d_db_k = q - lp.exp() if divergence == 1 else torch.where(q > 0, q * (lq - lp - d[:, None]), 0.0)
            # One spare column takes the absent ids' writes.
            d_db = torch.zeros(s.shape[0], vocab + 1, device=s.device)
            if bucket:
                lp_r = trest.reshape(-1)[rows]
                if divergence == 1:
                    coef = 1.0 - torch.where(lp_r > -math.inf, (lp_r - lq_rest).exp(), 0.0)
                else:
                    coef = torch.where(lq_rest > -math.inf, lq_rest - lp_r - d, 0.0)
                q_all = (s / temperature - lse_norm[:, None]).exp()
                d_db[:, :vocab] = torch.where(q_all > 0, coef[:, None] * q_all, 0.0)
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
