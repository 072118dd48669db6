"""`distillkit.reference`, the float64 oracle of the op, at its documented import path (the code is
in `distillkit.core.reference`)."""

from .core.reference import *  # noqa: F401,F403
from .core.reference import __all__  # noqa: F401
