"""TRL's `DistillationTrainer` loss on the fused op: `chunked_divergence_loss` and a process-wide patch.

    from distillkit.compat.trl import patch_distillation_trainer, unpatch_distillation_trainer
    patch_distillation_trainer()          # every trl.DistillationTrainer now uses distillkit's loss
    DistillationTrainer(...).train()
    unpatch_distillation_trainer()        # back to TRL's own

`chunked_divergence_loss` has the signature and the return values of TRL's
`trl.trainer.distillation_trainer._chunked_divergence_loss` (checked against TRL 1.16):

- logits z = transform(h W^T + b) / temperature per model, transform = scale, then the optional soft cap
  softcap * tanh(z / softcap); no T**2 factor.
- beta selects the divergence as in TRL's GKD loss (`trl_beta_divergence`): 0 forward KL(teacher || student),
  1 reverse KL(student || teacher), else the generalized JSD with mixture (1 - beta) p_s + beta p_t.
- Returns (loss, entropy_sum, n_valid): loss = sum over positions with completion_mask != 0 of the divergence,
  divided by max(n_valid, 1), or by num_items_in_batch when given; entropy_sum = the sum of the student's
  entropy (nats) over those positions; n_valid = their count (int64). loss and entropy_sum are float32
  whatever the inputs' dtype, as TRL's.

Differences from TRL, by design:
- Only the completion positions are projected (loss and entropy), on every device: one host-device sync per
  call, as TRL's `h[valid]` on its Triton devices (TRL projects every position elsewhere). Under torch.compile
  nothing is compacted or synchronized: masked positions are projected with weight 0.
- The entropy (a logged metric in TRL) costs one extra student projection per call: it is computed after the
  loss, under no_grad, in row chunks (never [N, V]), with the logits in the hidden states' dtype (TRL projects
  in fp32), so it differs from TRL's by that rounding for bf16 inputs.
- bf16/fp16 inputs: the fused op rounds each chunk's logits to the inputs' dtype (as an unfused model's logits
  are), then computes in fp32; TRL keeps the logits in fp32, so its bf16 loss value is closer to the fp32 one
  (the gradients' errors are comparable; tests/compat/test_trl_distillation.py::test_bf16_error). Under
  autocast TRL projects in the autocast dtype, this in the hidden states'. A head weight of another dtype
  than its hidden states is cast to theirs, as TRL does.
- DTensor heads (FSDP2): gathered once per call with the student's gradient averaged over the ranks, as FSDP2
  does for its other parameters (`distillkit.core.dtensor`); TRL calls `full_tensor()` with the default
  gradient placement, under which each rank keeps the shard of its own gradient only.
- beta outside [0, 1] raises (TRL silently returns a zero loss there), and so do a soft cap <= 0 (TRL reads 0
  as a cap of 1, a negative cap as its absolute value) and a logit scale <= 0 (TRL accepts them).
"""

from __future__ import annotations

import functools
import importlib

import torch

from ..core._checks import BACKENDS, check_choice
from ..core.dtensor import full_heads
from ..core.fused_linear import fused_linear_distill_loss
from ..core.row_compaction import rows_where, take_rows
from ..training.curriculum import token_entropy_from_hidden

_TRL_MODULE = "trl.trainer.distillation_trainer"
_TRL_LOSS = "_chunked_divergence_loss"
_original = None  # TRL's loss while the patch is on


def trl_beta_divergence(beta) -> dict:
    """distillkit's divergence options for TRL's beta (GKD and DistillationTrainer alike). TRL's beta is the
    teacher's weight in the mixture, which is distillkit's `jsd` beta; the endpoints are the KLs (the JSD's
    limits there are 0), so they are special-cased, as TRL does."""
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1]; got {beta}")
    if beta == 0.0:
        return dict(divergence="forward_kl")
    if beta == 1.0:
        return dict(divergence="reverse_kl")
    return dict(divergence="jsd", beta=beta)


def _softcap(name: str, value):
    if value is not None and not float(value) > 0:
        raise ValueError(f"{name} must be None or a number > 0; got {value}")
    return value


def _head(hidden, weight, bias):
    # TRL casts a head of another dtype (an fp32 master copy under mixed precision) to the hidden states' once.
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    return weight, bias


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0):
    """Drop-in for TRL's `_chunked_divergence_loss` on the fused op (module docstring)."""
    return _chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                                    teacher_lm_head_weight, completion_mask, beta, num_items_in_batch,
                                    student_lm_head_bias, teacher_lm_head_bias, student_logit_scale,
                                    teacher_logit_scale, student_final_logit_softcapping,
                                    teacher_final_logit_softcapping, temperature)


# TRL's parameter names (the patch with a backend is a partial of this, called with TRL's keywords).
def _chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                             teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                             student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                             teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                             teacher_final_logit_softcapping=None, temperature=1.0, *, backend: str = "auto"):
    h_s, h_t, scale_s, scale_t = student_hidden_states, teacher_hidden_states, student_logit_scale, teacher_logit_scale
    options = trl_beta_divergence(beta)
    softcap_s = _softcap("student_final_logit_softcapping", student_final_logit_softcapping)
    softcap_t = _softcap("teacher_final_logit_softcapping", teacher_final_logit_softcapping)
    # FSDP2 DTensor heads gathered once, for the loss and the entropy alike (core/dtensor.py: the student's
    # gradient is averaged over the ranks, as FSDP2 does for its other parameters).
    w_s, b_s, w_t, b_t = full_heads(h_s, student_lm_head_weight, student_lm_head_bias, h_t, teacher_lm_head_weight,
                                    teacher_lm_head_bias)
    w_s, b_s = _head(h_s, w_s, b_s)
    w_t, b_t = _head(h_t, w_t, b_t)
    lead = h_s.shape[:-1]
    if completion_mask.numel() != lead.numel():
        raise ValueError(f"completion_mask has shape {tuple(completion_mask.shape)} but student_hidden_states has "
                         f"leading shape {tuple(lead)}")
    valid = (completion_mask != 0).reshape(-1).to(h_s.device)
    n_valid = valid.sum()
    # Only the completion positions are projected, as TRL does on its Triton devices: one host-device sync
    # (none under torch.compile, where every row runs with weight 0 on the masked ones).
    rows = rows_where(valid, enabled=True)
    h_s, h_t = (take_rows(rows, h.reshape(-1, h.shape[-1])) for h in (h_s, h_t))
    weight = take_rows(rows, valid.to(torch.float32))
    total = fused_linear_distill_loss(
        h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, temperature=temperature, temperature_scaling=False,
        kl_weight=weight, reduction="sum", backend=backend, student_logit_scale=scale_s,
        teacher_logit_scale=scale_t, student_softcap=softcap_s, teacher_softcap=softcap_t, compact_rows=False,
        **options)
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1)  # a fully-masked batch gives 0, not 0 / 0
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    # The temperature folds into the transform: softcap * tanh(s z / softcap) / T = (softcap / T) * tanh((s / T) z
    # / (softcap / T)), so the curriculum's chunked entropy computes softmax(transform(z) / T)'s exactly.
    t = float(temperature)
    entropy = token_entropy_from_hidden(h_s, w_s, b_s,  # under no_grad
                                        transform=(scale_s / t, None if softcap_s is None else softcap_s / t))
    entropy_sum = (entropy * weight).sum()
    return loss, entropy_sum, n_valid


def _trl_module():
    try:
        module = importlib.import_module(_TRL_MODULE)
    except ImportError as exc:
        raise ImportError(f"patch_distillation_trainer needs trl>=1.16 ({_TRL_MODULE} does not import: {exc})") \
            from exc
    if not callable(getattr(module, _TRL_LOSS, None)):
        import trl
        raise ImportError(f"patch_distillation_trainer needs trl>=1.16, whose {_TRL_MODULE}.{_TRL_LOSS} it "
                          f"replaces; the installed trl {getattr(trl, '__version__', '?')} has none")
    return module


def patch_distillation_trainer(trainer_or_class=None, *, backend: str = "auto"):
    """Make TRL's `DistillationTrainer` compute its loss with `chunked_divergence_loss`; returns its argument.

    TRL's trainer calls its loss as the module global `trl.trainer.distillation_trainer._chunked_divergence_loss`,
    so the patch replaces that global: it is process-wide, for every DistillationTrainer (and subclass) instance.
    trainer_or_class (optional, for `trainer = patch_distillation_trainer(DistillationTrainer(...))`) must be a
    DistillationTrainer or one of its instances; it is returned unchanged. backend: the fused op's backend.
    Patching again only changes the backend; `unpatch_distillation_trainer()` restores TRL's loss.
    """
    global _original
    check_choice("backend", backend, BACKENDS)
    module = _trl_module()
    if trainer_or_class is not None:
        cls = trainer_or_class if isinstance(trainer_or_class, type) else type(trainer_or_class)
        if not issubclass(cls, module.DistillationTrainer):
            raise TypeError(f"trainer_or_class must be a trl DistillationTrainer (class or instance); got {cls!r}")
    loss = chunked_divergence_loss if backend == "auto" else functools.update_wrapper(
        functools.partial(_chunked_divergence_loss, backend=backend), chunked_divergence_loss)
    current = getattr(module, _TRL_LOSS)
    if _original is None or not _is_ours(current):  # keep the first original: patch twice, undo once
        _original = current
    setattr(module, _TRL_LOSS, loss)
    return trainer_or_class


def unpatch_distillation_trainer() -> None:
    """Undo `patch_distillation_trainer`: TRL's own loss again (a no-op when not patched)."""
    global _original
    if _original is None:
        return
    module = _trl_module()
    if _is_ours(getattr(module, _TRL_LOSS)):  # someone else's later patch stays in place
        setattr(module, _TRL_LOSS, _original)
    _original = None


def _is_ours(fn) -> bool:
    return fn is chunked_divergence_loss or getattr(fn, "func", None) is _chunked_divergence_loss


__all__ = ["chunked_divergence_loss", "patch_distillation_trainer", "unpatch_distillation_trainer",
           "trl_beta_divergence"]
