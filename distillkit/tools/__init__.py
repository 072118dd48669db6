"""Tools behind the `distillkit` command: benchmarks, the fused-vs-reference comparison, kernel and
CUDA resource reports, memory-traffic counting and the environment report."""
