"""Distillation from a sparse teacher: the teacher's top-k ids and log-probabilities per token.

    loss = distillkit.distill_loss_topk(student_logits, topk_ids, topk_logprobs, labels,
                                        tail="bucket", temperature=2.0, kl_weight=0.5, ce_weight=0.5)

The math is in docs/SPARSE.md and `distillkit.sparse.reference` (the oracle); the per-row kernel in
kernels/topk.py. Here: the custom ops `distillkit::topk_rows` / `topk_rows_backward` (fake
implementations, autograd), the chunked-PyTorch backend, the O(N K) teacher preprocessing and the
public function. Per-token weights and reductions go through `distillkit.core._reduce.weigh_and_reduce`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core import _checks
from ..core import backends
from ..core._checks import Weight
from ..core._reduce import mask_ignored_tokens, weigh_and_reduce
from ..core.reference import valid_labels
from .reference import REST_FLOOR, TAILS, TOPK_DIVERGENCES

TOPK_DIVERGENCE_IDS = {"forward_kl": 1, "reverse_kl": 2}
CHUNK_BYTES = 64 * 2**20  # fp32 temporaries of the torch backend per chunk of rows
# The shipped specializations (compiled ahead of time by `distillkit kernels`): one vocabulary block,
# and the top-k entries padded to one of BLOCK_K_SIZES.
BLOCK_V = 4096
BLOCK_K_SIZES = (64, 256, 1024)
NUM_WARPS = 8


def block_k(k: int) -> int:
    return next(size for size in BLOCK_K_SIZES if k <= size)


# -- teacher preprocessing (O(N K), plain tensor ops) ------------------------------------------------

def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and at -inf."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_log_probs(ids: Tensor, logprobs: Tensor, vocab_size: int, *, bucket: bool,
                      ratio: float) -> tuple[Tensor, Tensor]:
    """fp32 teacher log-probabilities over the categories: ([..., K], rest bucket [...] (0 when not bucket)).
    ratio = T0 / T rescales log-probabilities recorded at temperature T0 to the loss temperature T."""
    present = (ids >= 0) & (ids < vocab_size)
    lp = torch.where(present, logprobs.detach().float(), -math.inf)
    a = lp * ratio
    if not bucket:
        lse = torch.logsumexp(a, dim=-1, keepdim=True)
        return a - torch.where(torch.isfinite(lse), lse, 0.0), torch.zeros_like(lp[..., 0])
    recorded = torch.logsumexp(lp, dim=-1).clamp_max(0.0)  # log of the recorded top-k mass at T0
    rest = ratio * _log1mexp(recorded)  # the rest bucket, rescaled like one more category
    z = torch.logaddexp(torch.logsumexp(a, dim=-1), rest)  # finite: rest = 0 when nothing is present
    return a - z[..., None], (rest - z).clamp_min(math.log(REST_FLOOR))


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


# -- triton backend ----------------------------------------------------------------------------------

def _triton_launch(kernel_name, pre, student, ids, tlp, trest, labels, post, divergence, bucket, temperature,
                   ignore_index, with_ce):
    """Launch one program per row; `pre`/`post` are the kernel's tensor arguments before/after the inputs."""
    from ..core.backends._rows import as_rows, flat_labels
    from ..kernels import topk as K

    vocab, k = student.shape[-1], ids.shape[-1]
    n_rows = student.numel() // max(vocab, 1)
    if n_rows == 0:
        return
    s = as_rows(student)
    getattr(K, kernel_name)[(n_rows,)](
        *pre, s.tensor, ids.reshape(-1, k).long().contiguous(), tlp.reshape(-1, k).float().contiguous(),
        trest.reshape(-1).contiguous(), flat_labels(labels, student), *post, *s.addressing,
        vocab, k, 1.0 / temperature, ignore_index, REST_FLOOR,
        DIVERGENCE=divergence, BUCKET=bool(bucket and divergence), WITH_CE=with_ce,
        FULL_PASS=bool(with_ce or (bucket and divergence)),
        BLOCK_V=BLOCK_V, BLOCK_K=block_k(k), num_warps=NUM_WARPS)


# -- custom ops --------------------------------------------------------------------------------------

@torch.library.custom_op("distillkit::topk_rows", mutates_args=())
def topk_rows(student: Tensor, ids: Tensor, teacher_lp: Tensor, teacher_rest: Tensor, labels: Optional[Tensor],
              divergence: int, bucket: bool, temperature: float, ignore_index: int, with_ce: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (D [...], ce [...], stats [..., 4]) in fp32 (kernels/topk.py has the math)."""
    if backend == "torch":
        return _torch_forward(student, ids, teacher_lp, teacher_rest, labels, divergence, bucket, temperature,
                              ignore_index, with_ce)
    lead = student.shape[:-1]
    div = torch.empty(lead, dtype=torch.float32, device=student.device)
    ce, stats = torch.empty_like(div), torch.empty((*lead, 4), dtype=torch.float32, device=student.device)
    _triton_launch("topk_forward_kernel", (), student, ids, teacher_lp, teacher_rest, labels, (div, ce, stats),
                   divergence, bucket, temperature, ignore_index, with_ce)
    return div, ce, stats


@topk_rows.register_fake
def _(student, ids, teacher_lp, teacher_rest, labels, divergence, bucket, temperature, ignore_index, with_ce,
      backend):
    lead = student.shape[:-1]
    return (student.new_empty(lead, dtype=torch.float32), student.new_empty(lead, dtype=torch.float32),
            student.new_empty((*lead, 4), dtype=torch.float32))


@torch.library.custom_op("distillkit::topk_rows_backward", mutates_args=())
def topk_rows_backward(grad_div: Tensor, grad_ce: Tensor, student: Tensor, ids: Tensor, teacher_lp: Tensor,
                       teacher_rest: Tensor, labels: Optional[Tensor], stats: Tensor, divergence: int,
                       bucket: bool, temperature: float, ignore_index: int, with_ce: bool,
                       backend: str) -> Tensor:
    """The dense student gradient grad_div / T * dD/db + grad_ce * (softmax(s) - onehot(y))."""
    if backend == "torch":
        return _torch_backward(grad_div, grad_ce, student, ids, teacher_lp, teacher_rest, labels, stats,
                               divergence, bucket, temperature, ignore_index, with_ce)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    pre = (grad_div.reshape(-1).float().contiguous(), grad_ce.reshape(-1).float().contiguous())
    _triton_launch("topk_backward_kernel", pre, student, ids, teacher_lp, teacher_rest, labels,
                   (stats.contiguous(), grad), divergence, bucket, temperature, ignore_index, with_ce)
    return grad


@topk_rows_backward.register_fake
def _(grad_div, grad_ce, student, ids, teacher_lp, teacher_rest, labels, stats, divergence, bucket, temperature,
      ignore_index, with_ce, backend):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _setup_context(ctx, inputs, output):
    student, ids, teacher_lp, teacher_rest, labels, *options = inputs
    ctx.save_for_backward(student, ids, teacher_lp, teacher_rest, labels, output[2])
    ctx.options = tuple(options)
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_div, grad_ce, _grad_stats):
    student, ids, teacher_lp, teacher_rest, labels, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 11
    grad_div = torch.zeros_like(stats[..., 0]) if grad_div is None else grad_div
    grad_ce = torch.zeros_like(stats[..., 0]) if grad_ce is None else grad_ce
    grad = topk_rows_backward(grad_div, grad_ce, student, ids, teacher_lp, teacher_rest, labels, stats,
                              *ctx.options)
    return (grad,) + (None,) * 10


topk_rows.register_autograd(_backward, setup_context=_setup_context)


# -- public function ---------------------------------------------------------------------------------

def _resolve(backend: str, device: torch.device) -> str:
    _checks.check_choice("backend", backend, ("auto", "triton", "torch"))
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not backends.triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                         f"the logits are on {device}")
    return backend


def _is_zero(weight: Weight) -> bool:
    return not isinstance(weight, torch.Tensor) and weight == 0


def distill_loss_topk(
    student_logits: Tensor,
    teacher_topk_ids: Optional[Tensor],
    teacher_topk_logprobs: Optional[Tensor],
    labels: Optional[Tensor] = None,
    *,
    tail: str = "renormalize",
    teacher_temperature: Optional[float] = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    temperature_scaling: bool = True,
    kl_weight: Weight = 1.0,
    ce_weight: Weight = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
    check_labels: bool = True,
    divergence_on_ignored: bool = False,
) -> Tensor:
    """Distillation loss against a teacher known only through its top-k log-probabilities per token.

    Args:
        student_logits: [..., V] float32/float16/bfloat16; receives the (dense) gradient.
        teacher_topk_ids: [..., K] int32/int64 distinct ids per token; ids < 0 mark absent entries (padding).
            A token with no present id has no teacher signal: divergence weight 0, not counted by "mean".
        teacher_topk_logprobs: [..., K] log-probabilities of those ids, recorded at teacher_temperature.
        tail: "renormalize" (teacher and student both restricted to the K ids and renormalized) |
            "bucket" (one more category holding the remaining mass on each side: 1 - sum p, 1 - sum q).
        teacher_temperature: T0 the log-probabilities were recorded at (None: 1.0, the raw model); they are
            rescaled to the loss temperature T as p ∝ exp(logprob * T0 / T).
        divergence: "forward_kl" KL(p||q) | "reverse_kl" KL(q||p), over the categories.
        temperature, temperature_scaling, kl_weight, ce_weight, ignore_index, reduction, normalizer,
            check_labels, divergence_on_ignored: as in `distillkit.distill_loss` (CE at temperature 1 over
            the full vocabulary; an ignored label masks every term; check_labels also checks that no id is >= V).
        backend: "auto" (triton on CUDA, torch on CPU) | "triton" | "torch".
    Returns:
        The loss in float32.
    """
    _checks.check_options(divergence="forward_kl", beta=0.5, skew=0.1, temperature=temperature,
                          reduction=reduction, backend="auto")
    _checks.check_choice("divergence", divergence, TOPK_DIVERGENCES)
    _checks.check_choice("tail", tail, TAILS)
    _checks.check_logits("student_logits", student_logits)
    lead, vocab, device = student_logits.shape[:-1], student_logits.shape[-1], student_logits.device
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary dimension")
    _checks.check_weight("kl_weight", kl_weight, lead, device)
    _checks.check_weight("ce_weight", ce_weight, lead, device)
    _checks.check_normalizer(normalizer)
    _checks.check_labels(labels, student_logits)
    if teacher_temperature is not None and not (isinstance(teacher_temperature, (int, float))
                                                and 0 < teacher_temperature < math.inf):
        raise ValueError(f"teacher_temperature must be None or a finite float > 0; got {teacher_temperature!r}")
    with_div = not _is_zero(kl_weight)
    with_ce = labels is not None and not _is_zero(ce_weight)
    if labels is None and not _is_zero(ce_weight):
        raise ValueError("ce_weight is non-zero but labels is None: pass labels for the CE term")
    resolved = _resolve(backend, device)
    if with_div:
        ids, logprobs = teacher_topk_ids, teacher_topk_logprobs
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("teacher_topk_ids must be an int32/int64 tensor [..., K]")
        if not isinstance(logprobs, Tensor) or not logprobs.dtype.is_floating_point:
            raise TypeError("teacher_topk_logprobs must be a floating-point tensor [..., K]")
        if ids.dim() == 0 or ids.shape[:-1] != lead or logprobs.shape != ids.shape:
            raise ValueError(f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs "
                             f"{tuple(logprobs.shape)} must both be {tuple(lead)} + (K,)")
        if ids.shape[-1] > BLOCK_K_SIZES[-1]:
            raise ValueError(f"teacher_topk_ids has K={ids.shape[-1]} entries per token; at most "
                             f"{BLOCK_K_SIZES[-1]} are supported")
        if ids.device != device or logprobs.device != device:
            raise ValueError(f"the top-k tensors must be on {device}, like student_logits")
        if check_labels and not torch.compiler.is_compiling() and bool((ids >= vocab).any()):
            raise ValueError(f"teacher_topk_ids contains ids >= V = {vocab} (a teacher with a larger "
                             "vocabulary?); pass check_labels=False to treat them as absent")
    if with_ce and check_labels and not torch.compiler.is_compiling():
        _checks.check_label_range(labels, vocab, ignore_index)

    if with_div:
        ratio = (1.0 if teacher_temperature is None else float(teacher_temperature)) / temperature
        tlp, trest = teacher_log_probs(ids, logprobs, vocab, bucket=tail == "bucket", ratio=ratio)
        ids_k = ids.detach()
        has_teacher = ((ids >= 0) & (ids < vocab)).any(-1)
        kl_weight = kl_weight * has_teacher.to(torch.float32)
    else:  # CE only: the teacher is not read
        ids_k = torch.full((*lead, 1), -1, dtype=torch.int64, device=device)
        tlp = torch.full((*lead, 1), -math.inf, dtype=torch.float32, device=device)
        trest = torch.zeros(lead, dtype=torch.float32, device=device)
    div, ce, _ = topk_rows(student_logits, ids_k, tlp, trest, labels.long() if with_ce else None,
                           TOPK_DIVERGENCE_IDS[divergence] if with_div else 0, tail == "bucket",
                           float(temperature), int(ignore_index), bool(with_ce), resolved)
    valid = valid_labels(labels, vocab, ignore_index) if labels is not None else None
    kl_weight = mask_ignored_tokens(kl_weight, valid, divergence_on_ignored)
    return weigh_and_reduce(div, ce, valid, kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature,
                            temperature_scaling=temperature_scaling, reduction=reduction, normalizer=normalizer)
