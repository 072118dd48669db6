"""DTensor LM heads in the logits-free ops: a head sharded by FSDP2 (`fully_shard`: the parameter is a DTensor,
`Shard(0)`), or a DTensor `Replicate` / tensor-parallel one, is gathered into a plain tensor once per call,
before the custom op (which sees plain tensors only; the chunk loop never communicates).

The gradient. The op's gradient of this rank's loss w.r.t. the gathered weight is a plain [V, H] tensor on every
rank. `DTensor.full_tensor()` by default treats it as Replicate (already the same on every rank): each rank
would keep the slice of its OWN gradient, with no cross-rank reduction. The ranks' losses are on different
micro-batches (data parallel), so the gradient of the step is a reduction over the ranks, and FSDP2 averages
its parameters' gradients in its reduce-scatter (all-reduce for HSDP's replicate dimension) by default. The
gathered head declares its gradient `Partial("avg")` on every mesh dimension, so that the backward of the
gather reduce-scatters (Shard) or all-reduces (Replicate) the AVERAGE: the head's gradient follows the same
convention as every other FSDP2 parameter, and a loss normalized for data parallelism (each rank's sum over
its tokens / the global token count * world size, docs/DISTRIBUTED.md) gives every parameter, the head
included, the single-process gradient of the global batch (tests/parallel/test_fsdp_lm_head.py). On a mesh
dimension whose ranks compute the same loss (tensor parallel, a replicated batch), the average of equal
gradients is that gradient. A head that receives no gradient (the teacher's, a frozen student head) is
gathered under no_grad.

Hidden states under FSDP2 are plain tensors; a DTensor hidden state is rejected with a TypeError (its gradient
semantics are the caller's to choose: pass `.full_tensor()` or `.to_local()`).

`through_fsdp_outputs`: the trainer's logits-free path under FSDP2 (see its docstring).

No import cost: DTensor can only exist once torch.distributed.tensor is imported, so the module is looked up in
sys.modules, and without it every input is plain and returned as is.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

__all__ = ["full_heads", "gathered_linear", "through_fsdp_outputs"]


def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def _gather(tensor: Tensor, trainable: bool) -> Tensor:
    if trainable and torch.is_grad_enabled() and tensor.requires_grad:
        from torch.distributed.tensor import Partial
        return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)
    with torch.no_grad():
        return tensor.full_tensor()


def full_heads(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
               teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
               teacher_bias: Optional[Tensor] = None):
    """(student_weight, student_bias, teacher_weight, teacher_bias) with every DTensor gathered into a plain
    tensor (the student's with an averaged gradient, see the module docstring; the teacher's detached). The
    same objects when none is a DTensor."""
    dtensor = _dtensor_class()
    heads = (student_weight, student_bias, teacher_weight, teacher_bias)
    if dtensor is None:
        return heads
    for name, hidden in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if isinstance(hidden, dtensor):
            raise TypeError(f"{name} is a DTensor ({hidden.placements}); the logits-free loss takes plain hidden "
                            f"states (FSDP2's activations are plain): pass {name}.full_tensor() or "
                            f"{name}.to_local(), whichever has the gradient semantics you need")
    if not any(isinstance(t, dtensor) for t in heads):
        return heads
    return tuple(_gather(t, trainable=i < 2) if isinstance(t, dtensor) else t for i, t in enumerate(heads))


def gathered_linear(head):
    """`head` itself when its weight is a plain tensor; else a stand-in with the weight and bias gathered, detached
    (for the no-grad uses of an LM head: the trainer's head check, the teacher's head)."""
    dtensor = _dtensor_class()
    if dtensor is None or not (isinstance(head.weight, dtensor) or isinstance(head.bias, dtensor)):
        return head
    weight, bias, *_ = full_heads(None, head.weight.detach(), None if head.bias is None else head.bias.detach())
    return SimpleNamespace(weight=weight, bias=bias)


class _ThroughOutputs(torch.autograd.Function):
    """hidden, as is; its backward also sends a zero gradient to `output` (so that hooks on `output` fire)."""

    @staticmethod
    def forward(ctx, hidden, output):
        ctx.output_like = (output.shape, output.dtype, output.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.output_like
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def through_fsdp_outputs(model, hidden: Tensor, output: Optional[Tensor]) -> Tensor:
    """`hidden` (an intermediate activation of `model`), made to pass a zero gradient to the model's `output` in
    backward when `model` is an FSDP2 module; else `hidden` itself.

    FSDP2 registers a module's pre-backward hook, which all-gathers its resharded parameters for their backward,
    on the tensors its forward returns. The root module of a causal LM returns the logits; the logits-free loss
    uses the final hidden state instead, so without this the root's hook never fires and, with the root resharded
    after forward (`fully_shard(model, reshard_after_forward=True)`, accelerate's FSDP2 default), the backward of
    the root's own layers (embedding, final norm) reads freed parameter storage (a segfault on CPU)."""
    module = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(module, "FSDPModule", None) if module is not None else None
    if (fsdp_module is None or not isinstance(model, fsdp_module) or output is None or not output.requires_grad
            or not torch.is_grad_enabled()):
        return hidden
    return _ThroughOutputs.apply(hidden, output)
