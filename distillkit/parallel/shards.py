"""The two shard passes that need the GLOBAL per-row normalizers (docs/DISTRIBUTED.md): per row sum d and
sum h of the two-pass divergences over the shard, and the shard's slice of the student gradient, in Triton
(kernels/vocab_parallel.py) or chunked torch; which one is `backends.shard_implementation(backend)`."""

from __future__ import annotations

import torch

from ..core.backends._rows import NUM_STATS, STAT_LS_A, STAT_LS_B, STAT_M_S, STAT_M_T, as_rows, flush_subnormals
from ..core.backends.torch_rows import _chunks, _log_probs, divergence_grad, divergence_terms, softmax_at_1
from ..core.divergences import NO_DIVERGENCE

# The shard kernels stream a row in blocks like the core kernels (backends/triton_rows.py).
SHARD_TERMS_CONFIG = {"BLOCK_V": 4096, "num_warps": 8}
SHARD_BACKWARD_CONFIG = {"BLOCK_V": 4096, "num_warps": 8}


def _shard_terms(impl, student, teacher, stats, div_id, param_a, param_b, temperature, div_vocab):
    """Per row (sum d, sum h) over the shard's first div_vocab ids with the global normalizers in stats."""
    lead = student.shape[:-1]
    n_rows = stats[..., 0].numel()
    d = torch.zeros(lead, dtype=torch.float32, device=student.device)
    h = torch.zeros(lead, dtype=torch.float32, device=student.device)
    if n_rows == 0 or div_vocab == 0:
        return d, h
    if impl == "triton":
        from ..kernels import vocab_parallel as K

        s, t = as_rows(student), as_rows(teacher)
        K.shard_terms_kernel[(n_rows,)](
            s.tensor, t.tensor, stats.contiguous(), d, h, *s.addressing, *t.addressing,
            div_vocab, float(param_a), float(param_b), 1.0 / temperature, DIVERGENCE=div_id,
            BLOCK_V=SHARD_TERMS_CONFIG["BLOCK_V"], num_warps=SHARD_TERMS_CONFIG["num_warps"])
        return d, h
    s2 = student.reshape(-1, student.shape[-1])[:, :div_vocab]
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :div_vocab]
    st, d2, h2 = stats.reshape(-1, NUM_STATS), d.view(-1), h.view(-1)
    for rows in _chunks(n_rows, div_vocab):
        _, log_p = _log_probs(t2[rows].float(), st[rows, STAT_M_T], st[rows, STAT_LS_A], 1.0 / temperature)
        _, log_q = _log_probs(s2[rows].float(), st[rows, STAT_M_S], st[rows, STAT_LS_B], 1.0 / temperature)
        dd, hh = divergence_terms(log_p, log_q, log_p.exp(), log_q.exp(), param_a, param_b, div_id)
        d2[rows], h2[rows] = dd.sum(-1), hh.sum(-1)
    return d, h


def _shard_backward(impl, grad_div, grad_ce, student, teacher, local_labels, stats, div_id, param_a, param_b,
                    temperature,
                    with_ce, div_vocab):
    """grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y_local)) on the shard, global stats;
    grad_ce is already 0 where the (global) label is not valid, local labels outside [0, V_r) have no one-hot."""
    vocab = student.shape[-1]
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    n_rows = grad_div.numel()
    if n_rows == 0 or vocab == 0:
        return grad
    gd = grad_div.reshape(-1).float().contiguous()
    gc = grad_ce.reshape(-1).float().contiguous()
    if impl == "triton":
        from ..kernels import vocab_parallel as K

        s = as_rows(student)
        t = as_rows(teacher) if div_id != NO_DIVERGENCE else s
        block = SHARD_BACKWARD_CONFIG["BLOCK_V"]
        labels = local_labels.reshape(-1) if with_ce else torch.empty(0, dtype=torch.int64, device=student.device)
        K.shard_backward_kernel[(n_rows, -(-vocab // block))](
            gd, gc, s.tensor, t.tensor, labels, stats.contiguous(), grad, *s.addressing, *t.addressing,
            vocab, div_vocab, float(param_a), float(param_b), 1.0 / temperature, DIVERGENCE=div_id, WITH_CE=with_ce,
            BLOCK_V=block, num_warps=SHARD_BACKWARD_CONFIG["num_warps"])
        return grad
    g2, s2 = grad.view(-1, vocab), student.reshape(-1, vocab)
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :div_vocab] if div_id != NO_DIVERGENCE else None
    st = stats.reshape(-1, NUM_STATS)
    y2 = local_labels.reshape(-1) if with_ce else None
    inv_t = 1.0 / temperature
    for rows in _chunks(n_rows, vocab):
        s = s2[rows].float()
        out = torch.zeros_like(s)
        if div_id != NO_DIVERGENCE and div_vocab > 0:
            d_db = divergence_grad(s[:, :div_vocab], t2[rows].float(), st[rows], param_a, param_b, div_id, inv_t)
            out[:, :div_vocab] += torch.where(gd[rows, None] != 0, (gd[rows, None] / temperature) * d_db, 0.0)
        if with_ce:
            y = y2[rows]
            here = (y >= 0) & (y < vocab)
            onehot = torch.zeros_like(s)
            onehot.scatter_(-1, torch.where(here, y, 0)[:, None], here.float()[:, None])
            g_ce = gc[rows, None]
            out += torch.where(g_ce != 0, g_ce * (softmax_at_1(s, st[rows]) - onehot), 0.0)
        g2[rows] = flush_subnormals(out).to(grad.dtype)
    return grad
