"""python -m distillkit.demo [--full | --smoke] [--out DIR]"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
