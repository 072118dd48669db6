"""Benchmark machinery shared by ``benchmarks/`` (pytest-benchmark) and ``distillkit bench``.

- cases: ops, shapes (scaled down on CPU), dtypes, modes, inputs
- providers: distillkit backends, eager PyTorch, torch.compile, peers (Liger, TRL, torchtune) when installed
- measure: timing, peak memory (CUDA allocator / fresh-subprocess peak RSS), traffic, modeled roofline
- rows: one row per (op, provider, mode, shape, dtype, metric), JSON + CSV
- child: the subprocess entry point (peak RSS, traffic under TRITON_INTERPRET=1)
- plot: the comparison figure of ``distillkit bench --plot``
- progress: the progress bar of ``distillkit bench --run`` (a pytest plugin and the CLI's follower)
"""

from .cases import DTYPES, MODES, OPS, SHAPES, Case, make_case, make_inputs
from .rows import RowWriter, read_rows

__all__ = ["Case", "DTYPES", "MODES", "OPS", "SHAPES", "make_case", "make_inputs", "RowWriter", "read_rows"]
