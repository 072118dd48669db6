"""The distillation loss state in a checkpoint: the span weight table and the learned log-variances as
safetensors (nothing is ever unpickled), the `DistillationConfig` beside them as JSON."""

from __future__ import annotations

import json
import logging
import os

import torch

from ..core.modules import SpanDistillationLoss
from .config import DistillationConfig

# The trainer's logger: these warnings concern its resume, and log filters already name it.
logger = logging.getLogger("distillkit.training.trainer")

LOSS_STATE_NAME = "distill_loss.safetensors"  # span weight table and learned log-variances
CONFIG_NAME = "distill_config.json"

__all__ = ["LOSS_STATE_NAME", "CONFIG_NAME", "save_loss_state", "load_loss_state"]


def save_loss_state(loss_fn: SpanDistillationLoss, config: DistillationConfig, output_dir: str) -> None:
    """Write the span weight table (and learned log-variances) as safetensors, the config as JSON."""
    from safetensors.torch import save_file
    os.makedirs(output_dir, exist_ok=True)
    tensors = {"weight_table": loss_fn.weight_table.detach().cpu().contiguous()}
    if loss_fn.log_vars is not None:
        tensors["log_vars"] = loss_fn.log_vars.detach().cpu().contiguous()
    save_file(tensors, os.path.join(output_dir, LOSS_STATE_NAME), metadata={"format": "pt"})
    with open(os.path.join(output_dir, CONFIG_NAME), "w") as handle:
        json.dump(config.to_dict(), handle, indent=2)


def load_loss_state(loss_fn: SpanDistillationLoss, checkpoint: str) -> bool:
    """Restore the learned span weights of `loss_fn` in place from `checkpoint`; False if it has no loss state."""
    path = os.path.join(checkpoint, LOSS_STATE_NAME)
    if not os.path.isfile(path):
        if loss_fn.log_vars is not None:
            logger.warning("%s has no %s: the learnable span weights start from zero", checkpoint, LOSS_STATE_NAME)
        return False
    from safetensors.torch import load_file
    tensors = load_file(path)
    saved_table = tensors.get("weight_table")
    if saved_table is not None and not torch.equal(saved_table, loss_fn.weight_table.cpu()):
        logger.warning("the span weight table of %s differs from the configured one; using the configured one",
                       checkpoint)
    if loss_fn.log_vars is not None:
        if "log_vars" in tensors:
            with torch.no_grad():
                loss_fn.log_vars.copy_(tensors["log_vars"].to(loss_fn.log_vars.device))
        else:
            logger.warning("%s has no learned span weights: they start from zero", checkpoint)
    return True
