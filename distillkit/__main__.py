"""``python -m distillkit <command>``: the same as the ``distillkit`` console script."""

import sys

from .cli import main

sys.exit(main())
