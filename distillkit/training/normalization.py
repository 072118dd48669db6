"""How `DistillationTrainer` normalizes a micro-batch's loss: by the Trainer's num_items_in_batch (so that
micro-batches under gradient accumulation add up to the whole batch's loss), and across data-parallel
processes as Trainer.compute_loss does."""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["loss_normalizer", "scale_across_devices"]


def loss_normalizer(num_items_in_batch, targets: torch.Tensor, ignore_index: int,
                    learnable: bool) -> tuple[Optional[Union[torch.Tensor, int]], Union[torch.Tensor, float]]:
    """(the loss normalizer from num_items_in_batch or None, the scale of the learnable weights' regularizer)."""
    if num_items_in_batch is None:
        return None, 1.0
    normalizer = (num_items_in_batch.clamp_min(1) if isinstance(num_items_in_batch, torch.Tensor)
                  else max(num_items_in_batch, 1))
    # The learnable weights' regularizer sum_k s_k belongs once to the whole (accumulated) batch: each
    # micro-batch carries its share of the label tokens.
    reg_scale = 1.0
    if learnable:
        local = (targets != ignore_index).sum()
        reg_scale = local.to(torch.float32) / (normalizer.to(torch.float32) if isinstance(normalizer, torch.Tensor)
                                               else float(normalizer))
    return normalizer, reg_scale


def scale_across_devices(trainer, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """As Trainer.compute_loss: num_items_in_batch counts every process's tokens, DDP averages gradients."""
    if num_items_in_batch is not None and getattr(trainer.args, "average_tokens_across_devices", False):
        tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
        loss = loss * (trainer.accelerator.num_processes // tp if trainer.args.n_gpu <= 1 else trainer.args.n_gpu)
    return loss
