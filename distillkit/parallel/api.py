"""Vocabulary-parallel distillation loss: logits sharded along the vocabulary across a process group.

    # rank r holds the logits of ids [vocab_start, vocab_start + V_r) (e.g. a column-parallel LM head)
    loss = distillkit.parallel.distill_loss_vocab_parallel(
        student_shard, teacher_shard, labels, process_group=tp_group, vocab_start=start,
        divergence="forward_kl", temperature=2.0, kl_weight=0.5, ce_weight=0.5)
    loss.backward()   # student_shard.grad: this rank's slice of the full-vocabulary gradient

No rank ever holds the full vocabulary. Everything that is not a logit is REPLICATED: the rows
(leading shape), labels (global ids), per-token weights and the normalizer are the same on every
rank of the group, and so is the returned loss.

How (docs/DISTRIBUTED.md has the derivation):

1. Each rank runs the core forward op (``torch.ops.distillkit.distill_rows``) on its shard: the
   shard's log-normalizers lse_t_r, lse_s_r (at T) and lse1_r (at 1), and for the KLs the shard's
   own divergence div_r; it gathers the target logit when the label falls in its shard.
2. One MAX all-reduce of the per-row lse's, one SUM all-reduce of exp(lse_r - max), the KL
   accumulator exp(lse_r - max) * (div_r + lse_r - lse'_r), the target logit and an in-shard flag:
   this gives the global LSE's, D (forward/reverse KL), ce and which labels are valid.
3. jsd / skew / tvd need p and q normalized globally: a second pass over the shard
   (kernels/vocab_parallel.py, or torch) gives sum d and sum h per row, then one more SUM all-reduce.
4. Backward needs no communication: the loss is a function of the (replicated) per-row D and ce,
   so every rank receives the same grad_div / grad_ce and writes the gradient of its own shard from
   the GLOBAL stats saved by the forward: the core layout (backends/_rows.py) with each global
   log-normalizer as (max 0, log-sum LSE), the same precision as one LSE float.

Per token this all-reduces 4 * (#lse + #sums) bytes: 36 bytes for a KL + CE, 40 for a mixture
divergence + CE (``bytes_all_reduced_per_token``). No host-device synchronization, except the
optional label check (``check_labels=False`` skips it) and the default ``vocab_start`` (pass it).
"""


from __future__ import annotations

from typing import Optional

import torch

from ..core import _checks, backends, divergences
from ..core._checks import Weight, is_literal_zero
from ..core._reduce import LossTerms, mask_ignored_tokens, weigh_and_reduce
from ..core.divergences import NO_DIVERGENCE
from .groups import vocab_shard_range
from .ops import sharded_loss_terms
from .replicated import replicated_input

__all__ = ["distill_loss_vocab_parallel", "vocab_parallel_loss_terms", "vocab_shard_range", "replicated_input",
           "bytes_all_reduced_per_token"]


def vocab_parallel_loss_terms(
    student_shard: torch.Tensor,
    teacher_shard: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha_beta: tuple[float, float] = (0.5, 0.5),
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    check_labels: bool = True,
    with_divergence: bool = True,
    with_ce: Optional[bool] = None,
    vocab_mismatch: str = "error",
) -> LossTerms:
    """Per-token (global) divergence, cross-entropy and valid-label mask from vocabulary shards; the
    vocabulary-parallel counterpart of :func:`distillkit.loss_terms` (same arguments, plus
    process_group / vocab_start as in :func:`distill_loss_vocab_parallel`). Replicated on every rank."""
    options = _checks.check_options(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                                    temperature=temperature, reduction="none", backend=backend)
    with_ce = _checks.check_terms_inputs(student_shard, teacher_shard, labels, with_divergence=with_divergence,
                                         with_ce=with_ce, vocab_mismatch=vocab_mismatch)
    shard_size = student_shard.shape[-1]
    return LossTerms(*sharded_loss_terms(
        student_shard, teacher_shard.detach() if with_divergence else None, labels, process_group=process_group,
        vocab_start=vocab_start, div_id=divergences.IDS[divergence] if with_divergence else NO_DIVERGENCE,
        params=divergences.kernel_params(divergence, options), temperature=float(temperature),
        ignore_index=int(ignore_index), with_ce=bool(with_ce), check_labels=check_labels,
        div_vocab=min(shard_size, teacher_shard.shape[-1]) if with_divergence else shard_size,
        backend=backends.resolve(backend, student_shard.device, student_shard.dtype)))


def distill_loss_vocab_parallel(
    student_shard: torch.Tensor,
    teacher_shard: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha_beta: tuple[float, float] = (0.5, 0.5),
    temperature: float = 1.0,
    temperature_scaling: bool = True,
    kl_weight: Weight = 1.0,
    ce_weight: Weight = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
    check_labels: bool = True,
    vocab_mismatch: str = "error",
    divergence_on_ignored: bool = False,
) -> torch.Tensor:
    """:func:`distillkit.distill_loss` over logits sharded along the vocabulary across ``process_group``.

    Args:
        student_shard: [..., V_r] this rank's slice of the student logits (shards may differ in size and
            may be empty); receives the gradient of its slice.
        teacher_shard: [..., V_r] the same slice of the teacher logits (constant). Under
            vocab_mismatch="truncate" it may be narrower: the divergence covers, on each rank, the first
            min(V_r, V_teacher_r) ids of the shard (with padding on the last rank, as usual, that is the
            global truncation to the shared first ids); CE keeps every student id.
        labels: [...] GLOBAL label ids, identical on every rank (as are the weights and normalizer).
        process_group: the ranks that share the rows (a tensor-parallel group); default the world group.
            Without torch.distributed initialized and no group, it is the single-process loss.
        vocab_start: global id of this shard's first column. Pass it (e.g. from
            :func:`vocab_shard_range`): without it the shard sizes are all-gathered on the first call
            (a host-level collective) and cached per (group, shard size), which assumes a fixed layout.
        The other arguments are those of :func:`distillkit.distill_loss`.
    Returns:
        The loss (float32), identical on every rank. Backward on every rank (it needs no communication)
        writes each rank's slice of the gradient; a replicated input of the logits (the hidden state of a
        column-parallel LM head) must sum its gradient over the group: see :func:`replicated_input`.
    """
    _checks.check_options(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                          temperature=temperature, reduction=reduction, backend=backend)
    _checks.check_loss_inputs(student_shard, labels, kl_weight, ce_weight, normalizer)
    terms = vocab_parallel_loss_terms(
        student_shard, teacher_shard, labels, process_group=process_group, vocab_start=vocab_start,
        divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta, temperature=temperature,
        ignore_index=ignore_index, backend=backend, check_labels=check_labels, vocab_mismatch=vocab_mismatch,
        with_divergence=not is_literal_zero(kl_weight), with_ce=labels is not None and not is_literal_zero(ce_weight))
    kl_weight = mask_ignored_tokens(kl_weight, terms.valid_label, divergence_on_ignored)
    return weigh_and_reduce(*terms, kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature,
                            temperature_scaling=temperature_scaling, reduction=reduction, normalizer=normalizer)


def bytes_all_reduced_per_token(divergence: Optional[str], with_ce: bool) -> int:
    """fp32 bytes the forward all-reduces per row (the backward all-reduces nothing); divergence None
    means no divergence term (CE only)."""
    n_max = (2 if divergence else 0) + (1 if with_ce else 0)
    n_sum = (2 if divergence else 0) + (3 if with_ce else 0)
    if divergence in ("forward_kl", "reverse_kl"):
        n_sum += 1
    elif divergence:
        n_sum += 2  # second pass: sum d, sum h
    return 4 * (n_max + n_sum)
