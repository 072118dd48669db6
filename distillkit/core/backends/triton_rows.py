"""Launchers of the Triton kernels (allocation and grid; the math is in kernels/distill.py)."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ...kernels import distill as K
from ._rows import as_rows, flat_labels, row_outputs

# One program streams a row in blocks of BLOCK_V: 4096 fp32 lanes over 8 warps is
# 16 elements per thread per tensor, which keeps every variant spill-free on sm_80/sm_90
# (`distillkit kernels` prints the registers of each). One block size for every V: these
# configs are exactly the specializations compiled ahead of time in the tests.
FORWARD_CONFIG = {"BLOCK_V": 4096, "num_warps": 8}
BACKWARD_CONFIG = {"BLOCK_V": 4096, "num_warps": 8}


def shares_student(divergence: int, with_ce: bool, same_dtypes: bool, temperature: float = 1.0,
                   div_vocab: int = 0, vocab: int = 0) -> bool:
    """SHARED_STUDENT: at T == 1 over the whole vocabulary the student's stream at T is the CE stream, so the
    kernels compute its exponentials once. Compiled (and so used) for student and teacher of one dtype only."""
    return divergence != 0 and with_ce and same_dtypes and temperature == 1.0 and div_vocab == vocab


def forward(student: torch.Tensor, teacher: Optional[torch.Tensor], labels: Optional[torch.Tensor],
            divergence: int, param_a: float, param_b: float, temperature: float, ignore_index: int, with_ce: bool,
            div_vocab: int):
    div, ce, stats = row_outputs(student)
    n_rows, vocab = div.numel(), student.shape[-1]
    if n_rows == 0:
        return div, ce, stats
    s = as_rows(student)
    t = as_rows(teacher) if teacher is not None and divergence != 0 else s
    K.distill_forward_kernel[(n_rows,)](
        s.tensor, t.tensor, flat_labels(labels, student),
        div, ce, stats,
        *s.addressing, *t.addressing,
        vocab, div_vocab, float(param_a), float(param_b), 1.0 / temperature, ignore_index,
        DIVERGENCE=divergence, WITH_CE=with_ce,
        BLOCK_V=FORWARD_CONFIG["BLOCK_V"],
        SHARED_STUDENT=shares_student(divergence, with_ce, s.tensor.dtype == t.tensor.dtype, temperature, div_vocab,
                                      vocab),
        num_warps=FORWARD_CONFIG["num_warps"],
    )
    return div, ce, stats


def backward(grad_div: torch.Tensor, grad_ce: torch.Tensor, student: torch.Tensor,
             teacher: Optional[torch.Tensor], labels: Optional[torch.Tensor], stats: torch.Tensor,
             divergence: int, param_a: float, param_b: float, temperature: float, ignore_index: int, with_ce: bool,
             div_vocab: int):
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    n_rows, vocab = grad_div.numel(), student.shape[-1]
    if n_rows == 0:
        return grad
    s = as_rows(student)
    t = as_rows(teacher) if teacher is not None and divergence != 0 else s
    block = BACKWARD_CONFIG["BLOCK_V"]
    K.distill_backward_kernel[(n_rows, triton.cdiv(vocab, block))](
        grad_div.reshape(-1).float().contiguous(), grad_ce.reshape(-1).float().contiguous(),
        s.tensor, t.tensor, flat_labels(labels, student), stats.contiguous(), grad,
        *s.addressing, *t.addressing,
        vocab, div_vocab, float(param_a), float(param_b), 1.0 / temperature, ignore_index,
        DIVERGENCE=divergence, WITH_CE=with_ce, BLOCK_V=block,
        SHARED_STUDENT=shares_student(divergence, with_ce, s.tensor.dtype == t.tensor.dtype, temperature, div_vocab,
                                      vocab),
        num_warps=BACKWARD_CONFIG["num_warps"],
    )
    return grad
