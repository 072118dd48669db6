"""Vocabulary parallelism: the fused loss over a vocabulary sharded across ranks (tensor-parallel
LM heads), with the statistics all-reduced instead of the logits gathered. docs/DISTRIBUTED.md."""

from .api import distill_loss_vocab_parallel, replicated_input, vocab_shard_range

__all__ = ["distill_loss_vocab_parallel", "replicated_input", "vocab_shard_range"]
