"""Count global-memory traffic: Triton lanes under the interpreter, PyTorch ops by their tensors.

Two accountings, one context manager:

- **kernel lanes** (``TRITON_INTERPRET=1`` only): every ``tl.load`` / ``tl.store`` the
  interpreter executes goes through ``InterpreterBuilder.create_masked_load`` /
  ``create_masked_store`` (plain loads and stores and tensor-descriptor accesses
  are routed there too). Each enabled lane is charged its element size, read or
  written; masked-off lanes cost nothing. This is exactly what a kernel asks of
  global memory, before caches, so it is an upper bound on DRAM traffic of a
  kernel that streams each byte once.
- **eager ops**: a ``TorchDispatchMode`` charges every ATen op the bytes of the
  tensors it reads and the tensors it writes. Views (``func.is_view``) and
  allocations (``empty*``) cost nothing; a broadcast (stride-0) input costs only
  its distinct elements; ``copy_``, ``fill_``, ``zero_`` and ``out=`` arguments are
  written, not read. Custom ops (``torch.ops.distillkit.*``) are not charged
  themselves: what runs inside them is (their ATen ops, or their kernels' lanes).
  The interpreter's own host copies around a kernel launch are not charged.

    with count_traffic() as traffic:
        loss = distillkit.distill_loss(s, t, backend="triton")
        loss.backward()
    traffic.units(n_rows * vocab * s.element_size())   # bytes / one [N, V] logits tensor

One *unit* is ``N * V * elem`` bytes: one read of one ``[N, V]`` logits tensor.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Traffic", "count_traffic", "kernel_counting_available", "tensor_bytes", "units"]


@dataclass
class Traffic:
    """Bytes moved, split by who moved them."""

    kernel_read: int = 0
    kernel_written: int = 0
    eager_read: int = 0
    eager_written: int = 0
    kernel_launches: int = 0
    ops: Counter = field(default_factory=Counter)  # ATen op name -> bytes charged (eager)

    @property
    def read(self) -> int:
        return self.kernel_read + self.eager_read

    @property
    def written(self) -> int:
        return self.kernel_written + self.eager_written

    @property
    def kernel(self) -> int:
        return self.kernel_read + self.kernel_written

    @property
    def eager(self) -> int:
        return self.eager_read + self.eager_written

    @property
    def total(self) -> int:
        return self.read + self.written

    def units(self, unit_bytes: int) -> float:
        return self.total / unit_bytes

    def as_dict(self, unit_bytes: Optional[int] = None) -> dict:
        d = {"read": self.read, "written": self.written, "total": self.total,
             "kernel_read": self.kernel_read, "kernel_written": self.kernel_written,
             "eager_read": self.eager_read, "eager_written": self.eager_written,
             "kernel_launches": self.kernel_launches}
        if unit_bytes:
            d["units"] = self.total / unit_bytes
            d["unit_bytes"] = unit_bytes
        return d

    def __sub__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.kernel_read - other.kernel_read, self.kernel_written - other.kernel_written,
                       self.eager_read - other.eager_read, self.eager_written - other.eager_written,
                       self.kernel_launches - other.kernel_launches, self.ops - other.ops)

    def snapshot(self) -> "Traffic":
        return Traffic(self.kernel_read, self.kernel_written, self.eager_read, self.eager_written,
                       self.kernel_launches, Counter(self.ops))


def units(nbytes: int, n_rows: int, vocab: int, dtype: torch.dtype) -> float:
    """nbytes in units of one [n_rows, vocab] tensor of `dtype`."""
    return nbytes / (n_rows * vocab * torch.empty((), dtype=dtype).element_size())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies in memory: its distinct elements (stride-0 dims count once)."""
    if t.layout != torch.strided:
        return t.numel() * t.element_size()
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            distinct *= size
    return distinct * t.element_size()


def kernel_counting_available() -> bool:
    """Kernel lanes are counted only where Triton runs in its interpreter (TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton.runtime.interpreter  # noqa: F401  (only: is it importable)
    except Exception:
        return False
    return True


# -- eager accounting -----------------------------------------------------------------------------

_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_",
         "lift_fresh", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride", "sym_numel",
         "sym_storage_offset", "record_stream", "_has_compatible_shallow_copy_type", "detach_"}
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
                    "index_fill_", "masked_fill_"}


class _State:
    in_kernel = 0  # > 0 while the interpreter runs a kernel: its host copies are not the program's traffic


def _base_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _custom_op_body(func):
    """The Python function behind a torch.library.custom_op, or None."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef
        opdef = _maybe_get_opdef(func._schema.name)
    except Exception:
        return None
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


class _EagerCounter(TorchDispatchMode):
    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = func.namespace
        if namespace not in ("aten", "prims"):
            # A custom op: charge what runs inside it (ATen ops here, Triton lanes in the builder hooks).
            # Its Python body runs under a fresh counter; calling func again would only come back here.
            body = _custom_op_body(func)
            if body is not None:
                with _EagerCounter(self.traffic):
                    return body(*args, **kwargs)
            return func(*args, **kwargs)  # an opaque op (C++): nothing inside it is seen
        out = func(*args, **kwargs)
        if _State.in_kernel or func.is_view:
            return out
        name = _base_name(func)
        if name in _FREE:
            return out
        write_only = set()
        if name in _WRITE_ONLY_SELF and args and isinstance(args[0], torch.Tensor):
            write_only.add(id(args[0]))
        for key in ("out",):
            value = kwargs.get(key)
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor):
                    write_only.add(id(t))
        read = sum(tensor_bytes(t) for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor) and id(t) not in write_only)
        written = sum(tensor_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.traffic.eager_read += read
        self.traffic.eager_written += written
        self.traffic.ops[name] += read + written
        return out


# -- kernel lanes -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _hook_interpreter(traffic: Traffic, count_lanes: bool) -> Iterator[None]:
    """Count lanes (if count_lanes) and mark kernel launches, so their host copies are not charged."""
    import numpy as np
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    cls = type(builder)

    def lanes(ptrs, mask) -> int:
        return int(np.count_nonzero(np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data))))

    def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        itemsize = interp._get_np_dtype(ptrs.get_element_ty()).itemsize
        traffic.kernel_read += lanes(ptrs, mask) * itemsize
        return original_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        itemsize = interp._get_np_dtype(ptrs.get_element_ty()).itemsize
        traffic.kernel_written += lanes(ptrs, mask) * itemsize
        return original_store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    def grid_call(self, *args, **kwargs):
        traffic.kernel_launches += 1
        _State.in_kernel += 1
        try:
            return original_call(self, *args, **kwargs)
        finally:
            _State.in_kernel -= 1

    original_load, original_store = cls.create_masked_load, cls.create_masked_store
    original_call = interp.GridExecutor.__call__
    if count_lanes:
        cls.create_masked_load, cls.create_masked_store = create_masked_load, create_masked_store
    interp.GridExecutor.__call__ = grid_call
    try:
        yield
    finally:
        cls.create_masked_load, cls.create_masked_store = original_load, original_store
        interp.GridExecutor.__call__ = original_call


@contextlib.contextmanager
def count_traffic(*, kernels: Optional[bool] = None, eager: bool = True, traffic: Optional[Traffic] = None
                  ) -> Iterator[Traffic]:
    """Count bytes read and written inside the block (see the module docstring).

    kernels: count Triton lanes; needs TRITON_INTERPRET=1 set before Triton kernels are first
    defined (True raises RuntimeError without it; None, the default, counts them where possible).
    eager: charge ATen ops their tensors' bytes."""
    traffic = Traffic() if traffic is None else traffic
    if kernels is None:
        kernels = kernel_counting_available()
    with contextlib.ExitStack() as stack:
        if kernels:
            if not kernel_counting_available():
                raise RuntimeError("counting Triton lanes needs TRITON_INTERPRET=1 set before Triton is imported "
                                   "(pass kernels=False to count eager ops only)")
        if kernels or kernel_counting_available():
            stack.enter_context(_hook_interpreter(traffic, count_lanes=kernels))
        if eager:
            stack.enter_context(_EagerCounter(traffic))
        yield traffic
