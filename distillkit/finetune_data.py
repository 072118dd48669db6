"""`distillkit.finetune_data`: fine-tuning data export, at its documented import path (the code is in
`distillkit.agents.finetune_data`)."""

from .agents.finetune_data import *  # noqa: F401,F403
from .agents.finetune_data import __all__  # noqa: F401
