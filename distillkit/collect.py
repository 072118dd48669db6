"""`distillkit.collect`: teacher trajectory collection, at its documented import path (the code is in
`distillkit.agents.collect`)."""

from .agents.collect import *  # noqa: F401,F403
from .agents.collect import __all__  # noqa: F401
