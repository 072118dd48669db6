"""torchtune's knowledge-distillation losses on the fused op (drop-in classes).

    from distillkit.compat.torchtune import ForwardKLWithChunkedOutputLoss   # was torchtune.modules.loss
    kd_loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)

Same constructors, same forward signatures and the same values as `torchtune.modules.loss`
(torchtune 0.6, kd_losses.py), computed in fp32 like torchtune:

- `ForwardKLLoss`: torchtune's "forward KL" is the teacher cross-entropy  -sum_j p_j log q_j  per
  token (it leaves out the teacher entropy), p = softmax(teacher), q = softmax(student), at
  temperature 1. Here it is computed exactly as  KL(p || q) + H(p):  KL(p || q) comes from the fused
  op (forward and backward), H(p) from one extra pass over the teacher logits in row chunks under
  no_grad (bounded fp32 temporaries). H(p) does not depend on the student, so the student gradient
  is the fused op's, (q - p) per token: exactly torchtune's.
- `ReverseKLLoss`: KL(q || p) per token, from the fused op.
- `SymmetricKLLoss(sym_kd_ratio)`: ratio * forward + (1 - ratio) * reverse.
- Masking: tokens whose label is ignore_index contribute nothing; normalize=True divides by the
  number of the other tokens (0 when there is none), normalize=False returns the sum.
- The `*WithChunkedOutputLoss` variants take lists of logits chunks ([B, S/n, V] each) and the full
  [B, S] labels (chunked along dim 1 the same way) and divide the sum over chunks by the number of
  non-ignored tokens. As in torchtune, the forward variant returns 0 when there is no such token and
  the reverse and symmetric variants divide by 0 (NaN). Each chunk is one fused call.

Where the results may differ: with +-inf logits. torchtune drops the terms at positions where a
logit is infinite (the student's for the forward loss, either side for the reverse one); the fused
op keeps the exact divergence (e.g. +inf for reverse KL where the teacher has -inf and the student
has mass; a -inf teacher logit with a finite student is fine in the forward loss). With finite
logits the values agree to fp32 rounding and the student gradients are the same.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..core.functional import distill_loss

_ENTROPY_CHUNK_BYTES = 64 * 2**20


@torch.no_grad()
def _weighted_teacher_entropy(teacher_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_r weight[r] * H(softmax(teacher[r])) in fp32, in row chunks; rows of weight 0 are skipped by value."""
    vocab = teacher_logits.shape[-1]
    rows = teacher_logits.reshape(-1, vocab)
    w = weight.reshape(-1)
    step = max(1, _ENTROPY_CHUNK_BYTES // max(1, 16 * vocab))
    total = torch.zeros((), dtype=torch.float32, device=teacher_logits.device)
    for start in range(0, rows.shape[0], step):
        x = rows[start:start + step].float()
        log_p = x - torch.logsumexp(x, dim=-1, keepdim=True)
        p = log_p.exp()
        entropy = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
        total += torch.where(w[start:start + step] != 0, w[start:start + step] * entropy, 0.0).sum()
    return total


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.size(-1))


class _KLBase(nn.Module):
    """Shared forward: flatten to rows, mask by label, sum the per-token loss (`_sum`), normalize."""

    def __init__(self, ignore_index: int = -100, *, backend: str = "auto"):
        super().__init__()
        self.ignore_index = ignore_index
        self.backend = backend

    def _mask(self, labels: torch.Tensor, n_rows: int) -> torch.Tensor:
        mask = (labels != self.ignore_index).reshape(-1)
        if mask.numel() != n_rows:
            raise ValueError(f"labels has {mask.numel()} elements but the logits have {n_rows} rows")
        return mask

    def _forward_sum(self, student, teacher, mask) -> torch.Tensor:
        """sum over unmasked tokens of -sum_j p_j log q_j (torchtune's forward KL, unnormalized)."""
        weight = mask.to(torch.float32)
        kl = distill_loss(student, teacher, None, divergence="forward_kl", kl_weight=weight, reduction="sum",
                          backend=self.backend)
        return kl + _weighted_teacher_entropy(teacher, weight)

    def _reverse_sum(self, student, teacher, mask) -> torch.Tensor:
        """sum over unmasked tokens of KL(q || p)."""
        return distill_loss(student, teacher, None, divergence="reverse_kl", kl_weight=mask.to(torch.float32),
                            reduction="sum", backend=self.backend)

    def _sum(self, student, teacher, mask) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                normalize: bool = True) -> torch.Tensor:
        student, teacher = _rows(student_logits), _rows(teacher_logits)
        mask = self._mask(labels, student.shape[0])
        total = self._sum(student, teacher, mask)
        if not normalize:
            return total
        # torchtune returns 0 when no token is left; the sum is then exactly 0, and so is 0 / 1.
        return total / mask.sum().clamp_min(1)


class ForwardKLLoss(_KLBase):
    """torchtune.modules.loss.ForwardKLLoss: -sum p log q over non-ignored tokens (see the module docstring).

    forward(student_logits, teacher_logits, labels, normalize=True)."""

    def _sum(self, student, teacher, mask):
        return self._forward_sum(student, teacher, mask)


class ReverseKLLoss(_KLBase):
    """torchtune.modules.loss.ReverseKLLoss: KL(q || p) over non-ignored tokens.

    forward(student_logits, teacher_logits, labels, normalize=True)."""

    def _sum(self, student, teacher, mask):
        return self._reverse_sum(student, teacher, mask)


class SymmetricKLLoss(_KLBase):
    """torchtune.modules.loss.SymmetricKLLoss: sym_kd_ratio * forward + (1 - sym_kd_ratio) * reverse.

    forward(student_logits, teacher_logits, labels, normalize=True)."""

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100, *, backend: str = "auto"):
        super().__init__(ignore_index, backend=backend)
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        self.sym_kd_ratio = sym_kd_ratio

    def _sum(self, student, teacher, mask):
        return (self.sym_kd_ratio * self._forward_sum(student, teacher, mask)
                + (1 - self.sym_kd_ratio) * self._reverse_sum(student, teacher, mask))


class _Chunked(nn.Module):
    """forward(student_logits: list of [B, S/n, V], teacher_logits: list, labels [B, S]) -> scalar."""

    _zero_when_empty = False

    def __init__(self, loss: _KLBase, num_output_chunks: int, ignore_index: int):
        super().__init__()
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.loss = loss

    def forward(self, student_logits: List[torch.Tensor], teacher_logits: List[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
        label_chunks = labels.chunk(self.num_output_chunks, dim=1)
        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        for student, teacher, chunk_labels in zip(student_logits, teacher_logits, label_chunks):
            s, t = _rows(student), _rows(teacher)
            total = total + self.loss._sum(s, t, self.loss._mask(chunk_labels, s.shape[0]))
        count = (labels != self.ignore_index).sum()
        if self._zero_when_empty:
            return total / count.clamp_min(1)  # the sum is exactly 0 when count is 0: torchtune's 0.0
        return total / count  # as torchtune: 0 / 0 = NaN when every label is ignored


class ForwardKLWithChunkedOutputLoss(_Chunked):
    """torchtune.modules.loss.ForwardKLWithChunkedOutputLoss on the fused op (one call per chunk)."""

    _zero_when_empty = True

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, *, backend: str = "auto"):
        super().__init__(ForwardKLLoss(ignore_index, backend=backend), num_output_chunks, ignore_index)


class ReverseKLWithChunkedOutputLoss(_Chunked):
    """torchtune.modules.loss.ReverseKLWithChunkedOutputLoss on the fused op (one call per chunk)."""

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, *, backend: str = "auto"):
        super().__init__(ReverseKLLoss(ignore_index, backend=backend), num_output_chunks, ignore_index)


class SymmetricKLWithChunkedOutputLoss(_Chunked):
    """torchtune.modules.loss.SymmetricKLWithChunkedOutputLoss on the fused op (one call per chunk)."""

    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5, ignore_index: int = -100, *,
                 backend: str = "auto"):
        super().__init__(SymmetricKLLoss(sym_kd_ratio, ignore_index, backend=backend), num_output_chunks,
                         ignore_index)
        self.sym_kd_ratio = sym_kd_ratio


__all__ = ["ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss", "ForwardKLWithChunkedOutputLoss",
           "ReverseKLWithChunkedOutputLoss", "SymmetricKLWithChunkedOutputLoss"]
