"""Composition with a column-parallel LM head: the replicated hidden state's gradient is summed over the
group (Megatron's "copy to tensor-parallel region")."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import _all_reduce, _group, _group_name, _resolve_group


@torch.library.custom_op("distillkit::replicated_input", mutates_args=())
def _replicated_input_op(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """Identity (a copy: a custom op's output may not alias its input); the gradient is all-reduced."""
    return x.clone()


@_replicated_input_op.register_fake
def _(x, group_name, world):
    return torch.empty_like(x)


@torch.library.custom_op("distillkit::group_sum", mutates_args=())
def _group_sum(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """Sum of x over the group (a fresh tensor)."""
    return _all_reduce(x.contiguous().clone(), dist.ReduceOp.SUM, _resolve_group(group_name, world), world)


@_group_sum.register_fake
def _(x, group_name, world):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _replicated_setup_context(ctx, inputs, output):
    _, ctx.group_name, ctx.world = inputs


def _replicated_backward(ctx, grad):
    return _group_sum(grad, ctx.group_name, ctx.world), None, None


_replicated_input_op.register_autograd(_replicated_backward, setup_context=_replicated_setup_context)


def replicated_input(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient in backward, so that a tensor replicated across
    the group (the hidden state entering a column-parallel LM head) gets the gradient of every shard's
    logits (Megatron's "copy to tensor-parallel region"). DTensor's ColwiseParallel does this itself."""
    group, _, world = _group(process_group)
    return _replicated_input_op(x, _group_name(group, world), world)
