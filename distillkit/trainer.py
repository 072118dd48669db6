"""`distillkit.trainer`: the DistillationTrainer, at its documented import path (the code is in
`distillkit.training.trainer`)."""

from .training.trainer import *  # noqa: F401,F403
from .training.trainer import __all__  # noqa: F401
