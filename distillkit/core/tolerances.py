"""The one tolerance table: how close a backend must be to the float64 reference.

Used by the test suite and by `distillkit compare`. The reference is evaluated
in float64 on the same (already rounded) low-precision inputs, so the loss,
computed in fp32 by every backend, is held to fp32-level error for every input
dtype; the gradient is returned in the input dtype, so it carries that dtype's
rounding (bf16: 2**-8 relative).

    |actual - expected| <= atol * scale + rtol * |expected|

where scale is 1 for losses and max|expected| for gradients (gradients shrink
as 1/tokens under "mean", so an absolute floor must follow their magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES: dict[tuple[torch.dtype, str], Tolerance] = {
    (torch.float32, "loss"): Tolerance(atol=5e-5, rtol=1e-4),
    # fp32 gradients: p - q rounds at ~1e-7 of |s / T|, which low temperatures amplify.
    (torch.float32, "grad"): Tolerance(atol=2e-5, rtol=3e-4),
    (torch.float16, "loss"): Tolerance(atol=5e-5, rtol=1e-4),
    (torch.float16, "grad"): Tolerance(atol=2e-4, rtol=2e-3),
    (torch.bfloat16, "loss"): Tolerance(atol=5e-5, rtol=1e-4),
    (torch.bfloat16, "grad"): Tolerance(atol=2e-3, rtol=8e-3),
}

# Low precision: a backend's error may also be up to this factor times eager PyTorch's
# own error at that dtype (eager computing the same loss in that dtype).
EAGER_ERROR_FACTOR = 2.0


@dataclass(frozen=True)
class Mismatch:
    ok: bool
    max_abs: float
    max_rel: float
    worst_index: tuple
    actual: float
    expected: float

    def describe(self) -> str:
        return (f"max abs err {self.max_abs:.3e}, max rel err {self.max_rel:.3e}; worst at {self.worst_index}: "
                f"got {self.actual:.6e}, expected {self.expected:.6e}")


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str) -> Mismatch:
    """Elementwise check of `actual` against the float64 `expected` under TOLERANCES[(dtype, kind)]."""
    tol = TOLERANCES[(dtype if dtype != torch.float64 else torch.float32, kind)]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: got {tuple(a.shape)}, expected {tuple(e.shape)}")
    if a.numel() == 0:
        return Mismatch(True, 0.0, 0.0, (), 0.0, 0.0)
    same_nonfinite = (a == e) | (a.isnan() & e.isnan())  # inf == inf, NaN where the math says NaN
    err = torch.where(same_nonfinite, 0.0, (a - e).abs())
    err = torch.nan_to_num(err, nan=float("inf"))
    scale = 1.0 if kind == "loss" else float(e[e.isfinite()].abs().max()) if e.isfinite().any() else 1.0
    bound = tol.atol * scale + tol.rtol * e.abs().nan_to_num(0.0, posinf=0.0)
    excess = err - bound
    flat = int(torch.argmax(excess)) if excess.numel() > 0 else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    rel = err / e.abs().clamp_min(1e-30)
    return Mismatch(bool((excess <= 0).all()), float(err.max()), float(rel[err.isfinite()].max()) if err.isfinite().any() else float("inf"),
                    index, float(a.reshape(-1)[flat]), float(e.reshape(-1)[flat]))
