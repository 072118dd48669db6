"""Multi-process training helpers: process-group setup, global token counts, rank-aware logging.

Data parallel (DDP, FSDP, DeepSpeed ZeRO) gives every rank its own micro-batch, and the gradients
are AVERAGED over the ranks. A loss that is "sum over tokens / number of tokens" must divide by the
number of tokens of the GLOBAL batch (all ranks, all accumulation steps), or ranks with few tokens
weigh as much as ranks with many. The Hugging Face convention (``num_items_in_batch``,
``average_tokens_across_devices``) is

    loss_r = sum over rank r's tokens / N_global * world_size

where the factor world_size undoes the averaging of the gradient all-reduce, so that the summed
update equals the single-process one on the global batch:

    n = distillkit.training.distributed.global_token_count(labels)                 # all-reduced, no host sync
    loss = distillkit.distill_loss(s, t, labels, normalizer=n, ...) * distillkit.training.distributed.world_size()

The counts are tensors that stay on the device (all-reduce, no ``.item()``).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "local_rank", "is_main_process", "init_from_env", "shutdown",
           "all_reduce_sum", "global_token_count", "data_parallel_loss_scale", "rank_zero_only", "get_logger"]


def is_distributed() -> bool:
    """True when torch.distributed is initialized (e.g. under torchrun after init_process_group)."""
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def local_rank() -> int:
    """The rank on this node (torchrun's LOCAL_RANK), 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(backend: Optional[str] = None) -> torch.device:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) when there is more than one process, and return this rank's device.

    backend defaults to "nccl" with CUDA and "gloo" without. A single process (plain ``python``) is left
    uninitialized: every helper here then behaves as a world of one."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return device


def shutdown() -> None:
    """End of a multi-process script: wait for every rank, then destroy the process groups. Nothing for
    a single process.

    Drop what else holds the group first (``del`` the DDP wrapper): a gloo group still alive when
    Python exits can abort the process (SIGABRT, "terminate called without an active exception").
    Its worker thread, freeing a just-finished collective, may still need the GIL to release Python
    objects (the tensors, autograd's context) while the interpreter is finalizing. Destroying the last
    reference joins those threads before exit; the barrier lets them finish while the ranks wait."""
    if not is_distributed():
        return
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # a group held only by reference cycles (a dropped DDP wrapper) is destroyed here


def all_reduce_sum(x: Union[torch.Tensor, int, float], group=None, device=None) -> torch.Tensor:
    """Sum of x over the ranks of group, as a new tensor (x is not modified). No host sync."""
    out = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(x, device=device)
    if world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _count(x: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if x.dtype == torch.bool:
        return x.sum()
    if x.dtype.is_floating_point:  # a weight tensor: tokens with a non-zero weight
        return (x != 0).sum()
    return (x != ignore_index).sum()


def global_token_count(tokens: Union[torch.Tensor, Iterable[torch.Tensor]], *, ignore_index: int = -100,
                       group=None) -> torch.Tensor:
    """The number of loss-carrying tokens of the global batch, summed over the ranks of group (float32
    0-dim tensor on the tokens' device; no host sync). Pass this rank's labels (tokens != ignore_index
    count), a bool mask, or a per-token weight tensor (non-zero entries count); a list of them counts
    every micro-batch of a gradient-accumulation step, like the HF Trainer's ``num_items_in_batch``.

    Shift labels the way the loss sees them first (causal LM: ``labels[..., 1:]``)."""
    parts = [tokens] if isinstance(tokens, torch.Tensor) else list(tokens)
    if not parts:
        raise ValueError("global_token_count needs at least one tensor")
    local = torch.stack([_count(p, ignore_index) for p in parts]).sum().to(torch.float32)
    return all_reduce_sum(local, group)


def data_parallel_loss_scale(group=None) -> int:
    """world_size: the factor by which to multiply a loss normalized by the GLOBAL token count, since the
    data-parallel gradient all-reduce averages over the ranks (DDP, FSDP and ZeRO all do)."""
    return world_size(group)


def rank_zero_only(fn):
    """Run fn on rank 0 only (returns None elsewhere): for printing, saving, progress bars."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


class _RankFilter(logging.Filter):
    """Adds record.rank / record.world_size; lets non-zero ranks through only at min_level and above."""

    def __init__(self, min_level_other_ranks: int):
        super().__init__()
        self.min_level_other_ranks = min_level_other_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.world_size = rank(), world_size()
        return record.rank == 0 or record.levelno >= self.min_level_other_ranks


def get_logger(name: str = "distillkit", *, all_ranks: bool = False, level: int = logging.INFO) -> logging.Logger:
    """A logger whose lines start with "[rank r/w]"; ranks other than 0 log only warnings and errors unless
    all_ranks. Idempotent per name (one handler)."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    handler = next((h for h in logger.handlers if getattr(h, "_distillkit_rank", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._distillkit_rank = True
        handler.setFormatter(logging.Formatter("[rank %(rank)s/%(world_size)s] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    handler.filters = [_RankFilter(logging.DEBUG if all_ranks else logging.WARNING)]
    return logger
