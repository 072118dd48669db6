"""What is benchmarked: ops, shapes (scaled down on CPU), dtypes, modes, and their inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ...core import divergences

# Divergence ops (divergence only: kl_weight=1, no labels) and "ce" (cross-entropy only).
OPS = [*divergences.NAMES, "ce"]
MODES = ["forward", "backward", "forward+backward"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE = 2.0
BETA = 0.5  # jsd: symmetric at 0.5, so every peer's beta convention computes the same loss
SKEW = 0.1

# Nominal shapes (tokens N, vocabulary V); "peer" is the shape the peers publish (Liger KL / JSD on H100).
SHAPES = {
    "small": (512, 1271),
    "mid": (2048, 32000),
    "peer": (16384, 131072),
}
CPU_MAX_ELEMENTS = 2**22  # on CPU, N shrinks (V kept) so that N * V stays below this


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    v: int
    dtype: str  # key of DTYPES
    shape: str = ""  # name in SHAPES ("" for ad-hoc shapes)
    nominal_n: int = 0  # the unscaled N (== n on GPU)
    temperature: float = TEMPERATURE
    hidden: int = 0  # fused-linear ops: the hidden size H (logits = hidden @ weight.T)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def divergence(self) -> Optional[str]:
        return None if self.op == "ce" else self.op

    @property
    def fused_linear(self) -> bool:
        return self.op.startswith("fused_linear")

    @property
    def unit_bytes(self) -> int:
        """One unit: one [N, V] logits tensor."""
        return self.n * self.v * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def nominal_unit_bytes(self) -> int:
        return (self.nominal_n or self.n) * self.v * torch.empty((), dtype=self.torch_dtype).element_size()

    def with_n(self, n: int) -> "Case":
        return Case(self.op, n, self.v, self.dtype, self.shape, self.nominal_n or self.n, self.temperature,
                    self.hidden)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        return f"{self.op}-{self.shape or 'adhoc'}-{self.n}x{self.v}{f'-h{self.hidden}' if self.hidden else ''}-{self.dtype}"


def scaled_n(n: int, v: int, device: str, max_elements: int = CPU_MAX_ELEMENTS) -> int:
    """N for device: unchanged on CUDA; on CPU at most max_elements // V, a multiple of 8 (at least 8)."""
    if device != "cpu" or n * v <= max_elements:
        return n
    return max(8, (max_elements // v) // 8 * 8)


def make_case(op: str, shape: str, dtype: str, device: str) -> Case:
    n, v = SHAPES[shape]
    return Case(op, scaled_n(n, v, device), v, dtype, shape, n)


# Fused-linear (logits never materialized by the fused providers): the Liger chunked-loss shape.
LINEAR_SHAPES = {"peer": (8192, 4096, 128256)}  # N, H, V (Liger fused-linear JSD, H100 bf16)
CPU_LINEAR_SHAPE = (512, 128, 16000)  # what runs on CPU (the [N, V] logits are 31 MiB in fp32)


def make_linear_case(shape: str, dtype: str, device: str) -> Case:
    n, h, v = LINEAR_SHAPES[shape] if device != "cpu" else CPU_LINEAR_SHAPE
    return Case("fused_linear_jsd", n, v, dtype, shape if device != "cpu" else "cpu-linear", n, hidden=h)


def make_inputs(case: Case, device: str, seed: int = 0):
    """The loss function's arguments on device; the tensors that receive gradients require grad.

    Logits ops: (student logits, teacher logits or None, labels or None). Fused-linear ops:
    (student hidden [N, H], student weight [V, H], teacher hidden, teacher weight, labels)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if case.fused_linear:
        def rand(*shape, scale=1.0, grad=False):
            x = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=case.torch_dtype)
            return x.requires_grad_(grad)
        h = case.hidden
        return (rand(case.n, h, grad=True), rand(case.v, h, scale=h ** -0.5, grad=True), rand(case.n, h),
                rand(case.v, h, scale=h ** -0.5), torch.randint(0, case.v, (case.n,), generator=gen).to(device))
    student = (torch.randn(case.n, case.v, generator=gen) * 3).to(device=device, dtype=case.torch_dtype)
    student.requires_grad_()
    if case.op == "ce":
        labels = torch.randint(0, case.v, (case.n,), generator=gen).to(device)
        return student, None, labels
    teacher = (torch.randn(case.n, case.v, generator=gen) * 3).to(device=device, dtype=case.torch_dtype)
    return student, teacher, None
