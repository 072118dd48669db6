"""The loss components `DistillationTrainer` logs: per-span KL and CE sums on the logits-free path and
against a teacher cache, and
the log entries made from a logging window's sums (per-token means, curriculum, learned span weights)."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from ..core.modules import SpanDistillationLoss
from ..core.spans import SPAN_NAMES, Span
from .config import DistillationConfig

__all__ = ["hidden_state_components", "cached_teacher_components", "span_sums", "window_logs"]


@torch.no_grad()
def hidden_state_components(cfg: DistillationConfig, loss_fn: SpanDistillationLoss, hidden: torch.Tensor,
                            head: nn.Linear, t_hidden: Optional[torch.Tensor], t_head: Optional[nn.Linear],
                            targets: torch.Tensor, spans: torch.Tensor,
                            transforms: tuple = (1.0, None, 1.0, None)) -> dict[str, torch.Tensor]:
    """The per-span sums of SpanDistillationLoss.last_components, from hidden states (extra chunk passes).
    transforms: (student scale, softcap, teacher scale, softcap) of the models' logits (lm_head.logit_transform)."""
    # Imported here: the trainer works without this op, and only its logits-free path (which needs it) calls this.
    from ..core.fused_linear import fused_linear_distill_loss
    common = dict(divergence=cfg.divergence, beta=cfg.beta, skew=cfg.skew, alpha_beta=cfg.alpha_beta,
                  temperature=cfg.temperature, temperature_scaling=cfg.temperature_scaling,
                  ignore_index=cfg.ignore_index, reduction="none", backend=cfg.backend, check_labels=False,
                  vocab_mismatch=cfg.vocab_mismatch, chunk_size=cfg.chunk_size, student_logit_scale=transforms[0],
                  student_softcap=transforms[1])
    teacher_transform = dict(teacher_logit_scale=transforms[2], teacher_softcap=transforms[3])
    table = loss_fn.weight_table.cpu()  # one copy, then every weight test runs on the host
    h, w = hidden.detach(), head.weight.detach()
    b = head.bias.detach() if head.bias is not None else None
    div = ce = None
    if (table[:, 0] != 0).any():
        div = fused_linear_distill_loss(h, w, t_hidden, t_head.weight, None, student_bias=b,
                                        teacher_bias=t_head.bias, kl_weight=1.0, ce_weight=0.0, **teacher_transform,
                                        **common)
    if (table[:, 1] != 0).any():
        ce = fused_linear_distill_loss(h, w, None, None, targets, student_bias=b, kl_weight=0.0, ce_weight=1.0,
                                       **common)
    return span_sums(table, spans, div, ce)


@torch.no_grad()
def cached_teacher_components(cfg: DistillationConfig, loss_fn: SpanDistillationLoss, tail: str,
                              cache_temperature: float, ids: torch.Tensor, logprobs: torch.Tensor,
                              targets: torch.Tensor, spans: torch.Tensor, *, logits: Optional[torch.Tensor] = None,
                              hidden: Optional[torch.Tensor] = None,
                              head: Optional[nn.Linear] = None) -> dict[str, torch.Tensor]:
    """The per-span sums against a teacher cache (extra passes of the top-k op, from logits or hidden states)."""
    from ..sparse.fused_linear_topk import fused_linear_distill_loss_topk
    from ..sparse.topk import distill_loss_topk
    common = dict(tail=tail, teacher_temperature=cache_temperature, divergence=cfg.divergence,
                  temperature=cfg.temperature, temperature_scaling=cfg.temperature_scaling,
                  ignore_index=cfg.ignore_index, reduction="none", backend=cfg.backend, check_labels=False)
    if logits is not None:
        def per_token(**weights):
            return distill_loss_topk(logits.detach(), ids, logprobs, **weights, **common)
    else:
        b = head.bias.detach() if head.bias is not None else None

        def per_token(**weights):
            return fused_linear_distill_loss_topk(hidden.detach(), head.weight.detach(), ids, logprobs,
                                                  student_bias=b, chunk_size=cfg.chunk_size, **weights, **common)
    table = loss_fn.weight_table.cpu()
    div = per_token(labels=None, kl_weight=1.0, ce_weight=0.0) if (table[:, 0] != 0).any() else None
    ce = per_token(labels=targets, kl_weight=0.0, ce_weight=1.0) if (table[:, 1] != 0).any() else None
    return span_sums(table, spans, div, ce)


def span_sums(table: torch.Tensor, spans: torch.Tensor, div: Optional[torch.Tensor],
              ce: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Token counts and the per-token KL/CE sums of each span with a non-zero weight in the table."""
    out = {}
    for span in Span:
        name = span.name.lower()
        in_span = spans == span
        out[f"tokens/{name}"] = in_span.sum()
        if div is not None and table[span, 0] != 0:
            out[f"kl/{name}"] = torch.where(in_span, div, 0.0).sum()
        if ce is not None and table[span, 1] != 0:
            out[f"ce/{name}"] = torch.where(in_span, ce, 0.0).sum()
    return out


def window_logs(sums: Mapping[str, float], loss_fn: SpanDistillationLoss,
                competence: Optional[float]) -> dict[str, float]:
    """Log entries from the component sums of one logging window (all processes): KL and CE per span as
    per-token means, the curriculum's competence and mean sample weight, the learned span weights."""
    logs = {}
    for name in SPAN_NAMES:
        count = sums.get(f"tokens/{name}", 0.0)
        for kind in ("kl", "ce"):
            key = f"{kind}/{name}"
            if key in sums and count > 0:
                logs[key] = sums[key] / count
    if sums.get("curriculum/samples"):
        logs["curriculum/competence"] = competence
        logs["curriculum/mean_weight"] = sums["curriculum/weight_sum"] / sums["curriculum/samples"]
    if loss_fn.log_vars is not None:
        table = loss_fn.effective_table().detach().cpu()
        for span in Span:
            for col, kind in enumerate(("kl", "ce")):
                if loss_fn.weight_table[span, col] != 0:
                    logs[f"span_weight/{kind}/{span.name.lower()}"] = float(table[span, col])
    return logs
