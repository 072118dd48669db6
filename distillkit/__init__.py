"""distillkit: fused kernels for distilling large language-model agents into small ones.

    loss = distillkit.distill_loss(student_logits, teacher_logits, distillkit.shift_labels(labels),
                                   divergence="forward_kl", temperature=2.0,
                                   kl_weight=0.5, ce_weight=0.5)
"""

from .core import reference
from .core.functional import LossTerms, distill_loss, loss_terms, shift_labels
from .core.fused_linear import fused_linear_distill_loss
from .core.modules import DistillationLoss, SpanDistillationLoss
from .core.spans import PAD_SPAN, Span
from .sparse.teacher_cache import TeacherCache, TeacherCacheError, TopKBatch, write_teacher_cache
from .sparse.fused_linear_topk import fused_linear_distill_loss_topk
from .sparse.topk import distill_loss_topk
from .core.vocab import truncate_to_shared_vocab

__version__ = "0.6.1"

__all__ = ["distill_loss", "loss_terms", "shift_labels", "LossTerms", "DistillationLoss", "SpanDistillationLoss",
           "fused_linear_distill_loss", "distill_loss_topk", "fused_linear_distill_loss_topk", "truncate_to_shared_vocab",
           "write_teacher_cache", "TeacherCache", "TopKBatch", "TeacherCacheError",
           "Span", "PAD_SPAN", "reference", "__version__"]
