"""TRL's GKD loss on the fused op: `generalized_jsd_loss` and a one-line patch for `GKDTrainer`.

TRL's `DistillationTrainer` (TRL >= 1.16) loss is in `distillkit.compat.trl_distillation`, re-exported here:
`chunked_divergence_loss`, `patch_distillation_trainer()`, `unpatch_distillation_trainer()`.

    from distillkit.compat.trl import patch_gkd_trainer
    trainer = patch_gkd_trainer(GKDTrainer(...))      # or patch_gkd_trainer(GKDTrainer): the class
    trainer.train()

`generalized_jsd_loss` has the signature and the semantics of TRL's
`GKDTrainer.generalized_jsd_loss` (checked against TRL 1.16, `trl.experimental.gkd`):

- p = softmax(teacher / T), q = softmax(student / T); no T**2 factor.
- beta == 0: KL(p || q) (forward KL); beta == 1: KL(q || p) (reverse KL); otherwise the
  generalized JSD  beta KL(p || m) + (1 - beta) KL(q || m)  with  m = beta p + (1 - beta) q.
  TRL's beta is the teacher's weight in the mixture, which is exactly distillkit's `jsd` beta, so
  the three cases map onto `forward_kl`, `reverse_kl` and `jsd(beta)` (the limits beta -> 0 and
  beta -> 1 of the JSD are 0, not the KLs: TRL special-cases the endpoints, and so does this;
  the mapping is `trl_beta_divergence`, shared with the DistillationTrainer loss).
- labels: positions with label -100 are left out (the mask is always `labels != -100`).
- num_items_in_batch (when not None) overrides the reduction: sum / num_items_in_batch.
- reduction "batchmean": sum / max(#unmasked tokens, 1) with labels, sum / max(size(0), 1) without
  (TRL divides by the first dimension only: the batch size for [B, S, V] logits);
  "sum": the sum; "mean": the mean over the *elements* of TRL's per-element tensor, i.e.
  sum / (#tokens * V) (NaN when no token is left, as torch's mean of an empty tensor);
  any other value ("none"): TRL's per-element tensor ([#unmasked, V] with labels, the logits'
  shape without). That one cannot be fused (it *is* a [tokens x vocabulary] tensor), so it is
  computed in plain PyTorch like TRL does.
- The result has TRL's dtype (that of the log-probabilities: the promoted logits dtype); the fused
  op computes in fp32. The teacher is a constant here (TRL's GKDTrainer computes its logits under
  no_grad, so nothing changes there).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..core.functional import distill_loss
from .trl_distillation import (chunked_divergence_loss, patch_distillation_trainer, trl_beta_divergence,
                               unpatch_distillation_trainer)

_FUSED_REDUCTIONS = ("batchmean", "sum", "mean")


def _elementwise_jsd(student_logits, teacher_logits, beta: float, temperature: float) -> torch.Tensor:
    """TRL's per-element terms (materialized: only for reduction="none")."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    b = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
    mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log1p(-b), teacher_log_probs + torch.log(b)]),
                              dim=0)
    kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
    return b * kl_teacher + (1 - b) * kl_student


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """Drop-in for TRL's `GKDTrainer.generalized_jsd_loss` on the fused op (module docstring)."""
    return _generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction,
                                 num_items_in_batch, backend="auto")


def _generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction,
                          num_items_in_batch, *, backend: str):
    options = trl_beta_divergence(beta)
    beta = float(beta)
    temperature = float(temperature)
    out_dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    mask = labels != -100 if labels is not None else None

    if num_items_in_batch is None and reduction not in _FUSED_REDUCTIONS:
        jsd = _elementwise_jsd(student_logits, teacher_logits.detach(), beta, temperature)
        return jsd[mask] if mask is not None else jsd

    kl_weight = mask.to(torch.float32) if mask is not None else 1.0
    total = distill_loss(student_logits, teacher_logits, None, temperature=temperature, temperature_scaling=False,
                         kl_weight=kl_weight, reduction="sum", backend=backend, **options)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        result = total / num_items_in_batch
    elif reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if mask is not None else max(student_logits.size(0), 1)
        result = total / denom
    elif reduction == "sum":
        result = total
    else:  # "mean": over the elements of the per-element tensor (tokens x vocabulary)
        vocab = student_logits.shape[-1]
        count = mask.sum() * vocab if mask is not None else student_logits.numel()
        result = total / count
    return result.to(out_dtype)


def patch_gkd_trainer(trainer_or_class=None, *, backend: str = "auto"):
    """Make a GKD trainer use the fused `generalized_jsd_loss`; returns its argument.

    trainer_or_class: a GKDTrainer instance (only it is patched), a GKDTrainer (sub)class (all its
    instances), or None for TRL's GKDTrainer class itself. backend: the fused op's backend.
    """
    if trainer_or_class is None:
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            from trl import GKDTrainer  # older TRL
        trainer_or_class = GKDTrainer
    loss = generalized_jsd_loss if backend == "auto" else functools.wraps(generalized_jsd_loss)(
        lambda student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
        num_items_in_batch=None: _generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                                       reduction, num_items_in_batch, backend=backend))
    if isinstance(trainer_or_class, type):
        trainer_or_class.generalized_jsd_loss = staticmethod(loss)
    else:
        # An instance attribute is not bound: self.generalized_jsd_loss(...) calls it with TRL's arguments.
        trainer_or_class.generalized_jsd_loss = loss
    return trainer_or_class


__all__ = ["generalized_jsd_loss", "patch_gkd_trainer", "chunked_divergence_loss", "patch_distillation_trainer",
           "unpatch_distillation_trainer"]
