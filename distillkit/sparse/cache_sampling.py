"""The "sample" mode of the teacher cache: per position, k token ids drawn from the teacher's softmax
(with replacement), stored as the empirical distribution: the distinct ids with log(count / k)
(Sparse Logit Sampling, ACL 2025). Unlike the top-k, it is an unbiased estimate of the teacher.

The random stream of an example depends only on (seed, example index): one generator per example,
seeded from both, draws that example's positions. So the cache does not depend on the batch size, on
resuming, or on how the examples are split across processes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Union

import torch

from .cache_format import MAX_SEED

__all__ = ["example_generator", "sample_empirical", "empirical_distribution"]


def example_generator(seed: int, example: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """The generator of example `example`: seeded by a hash of (seed, example), so that nearby seeds and
    indices give unrelated streams (seed + example would make (0, 1) and (1, 0) the same)."""
    digest = hashlib.sha256(f"distillkit-teacher-cache:{seed}:{example}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & MAX_SEED)
    return generator


def empirical_distribution(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [L, k], logprobs float32 [L, k]) from draws [L, k]: each distinct id once, with
    log(count / k), ordered by count (ties: smaller id first); the entries left over (fewer than k
    distinct ids) are absent: id 0, log-probability -inf (read back as id -1)."""
    k = draws.shape[-1]
    ids = draws.sort(dim=-1).values
    # count of each drawn id: the width of its run in the sorted row
    counts = (torch.searchsorted(ids, ids, right=True) - torch.searchsorted(ids, ids, right=False))
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    counts = torch.where(first, counts, 0)  # one entry per distinct id; repeats carry no count
    # stable: equal counts stay in id order; the zero counts (repeats) go last
    counts, order = counts.sort(dim=-1, descending=True, stable=True)
    ids = torch.where(counts > 0, ids.gather(-1, order), 0)
    logprobs = torch.where(counts > 0, torch.log(counts.float() / k), -math.inf)
    return ids, logprobs


def sample_empirical(logits: torch.Tensor, k: int, temperature: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k draws per row of logits [L, V] from softmax(logits / temperature), as empirical_distribution."""
    if logits.shape[0] == 0:
        return (torch.zeros(0, k, dtype=torch.int64, device=logits.device),
                torch.zeros(0, k, dtype=torch.float32, device=logits.device))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)
    return empirical_distribution(draws)
