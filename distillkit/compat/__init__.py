"""Drop-in replacements for the distillation losses of other libraries, on distillkit's fused op.

- `distillkit.compat.trl`: `generalized_jsd_loss` (TRL's `GKDTrainer.generalized_jsd_loss`) and
  `patch_gkd_trainer(trainer_or_class)`, the one-line swap for a GKD trainer; `chunked_divergence_loss`
  (TRL >= 1.16 `DistillationTrainer`'s loss) and `patch_distillation_trainer()` /
  `unpatch_distillation_trainer()` (process-wide: TRL calls that loss as a module global).
- `distillkit.compat.torchtune`: `ForwardKLLoss`, `ReverseKLLoss`, `SymmetricKLLoss` and their
  `*WithChunkedOutputLoss` variants (torchtune.modules.loss).

Neither module imports TRL or torchtune on import (patch_gkd_trainer imports TRL only when given no
target; patch_distillation_trainer imports it when called).
See docs/TRAINER.md, "One-line swaps".
"""

from .torchtune import (ForwardKLLoss, ForwardKLWithChunkedOutputLoss, ReverseKLLoss, ReverseKLWithChunkedOutputLoss,
                        SymmetricKLLoss, SymmetricKLWithChunkedOutputLoss)
from .trl import (chunked_divergence_loss, generalized_jsd_loss, patch_distillation_trainer, patch_gkd_trainer,
                  unpatch_distillation_trainer)

__all__ = ["generalized_jsd_loss", "patch_gkd_trainer", "chunked_divergence_loss", "patch_distillation_trainer",
           "unpatch_distillation_trainer", "ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss",
           "ForwardKLWithChunkedOutputLoss", "ReverseKLWithChunkedOutputLoss", "SymmetricKLWithChunkedOutputLoss"]
