"""Drop-in replacements for the distillation losses of other libraries, on distillkit's fused op.

- `distillkit.compat.trl`: `generalized_jsd_loss` (TRL's `GKDTrainer.generalized_jsd_loss`) and
  `patch_gkd_trainer(trainer_or_class)`, the one-line swap for a GKD trainer.
- `distillkit.compat.torchtune`: `ForwardKLLoss`, `ReverseKLLoss`, `SymmetricKLLoss` and their
  `*WithChunkedOutputLoss` variants (torchtune.modules.loss).

Neither module imports TRL or torchtune (the patch imports TRL only when given no target).
See docs/TRAINER.md, "One-line swaps".
"""

from .torchtune import (ForwardKLLoss, ForwardKLWithChunkedOutputLoss, ReverseKLLoss, ReverseKLWithChunkedOutputLoss,
                        SymmetricKLLoss, SymmetricKLWithChunkedOutputLoss)
from .trl import generalized_jsd_loss, patch_gkd_trainer

__all__ = ["generalized_jsd_loss", "patch_gkd_trainer", "ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss",
           "ForwardKLWithChunkedOutputLoss", "ReverseKLWithChunkedOutputLoss", "SymmetricKLWithChunkedOutputLoss"]
