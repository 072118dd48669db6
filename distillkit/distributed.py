"""`distillkit.distributed`: multi-process helpers, at its documented import path (the code is in
`distillkit.training.distributed`)."""

from .training.distributed import *  # noqa: F401,F403
from .training.distributed import __all__  # noqa: F401
