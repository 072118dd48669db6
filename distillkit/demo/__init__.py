"""End-to-end agent distillation demo: ``distillkit demo`` (see docs/DEMO.md).

:func:`distillkit.demo.cli.main` is the entry point; :mod:`.env` is the synthetic tool-use
environment, :mod:`.pipeline` the demo itself, :mod:`.evaluate` its metrics.
"""


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
