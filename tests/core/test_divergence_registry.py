"""The divergence registry (distillkit/core/divergences.py) is the one source of names and ids: the
kernels' constants agree with it, every entry point rejects an unknown name with the same error,
every backend rejects an unknown id loudly, and the alpha-beta divergence meets its limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import available_backends

import distillkit
from distillkit.core import divergences, reference
from distillkit.core.backends import torch_rows
from distillkit.core.tolerances import compare
from distillkit.parallel import distill_loss_vocab_parallel
from distillkit.training.config import DistillationConfig

ROOT = Path(__file__).resolve().parents[2]


def _snake(camel: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", camel).lower()


def test_triton_constants_are_the_registry_ids():
    from distillkit.kernels import divergence_terms as K

    for name, div_id in divergences.IDS.items():
        assert getattr(K, name.upper()).value == div_id, name
    assert K.NONE.value == divergences.NO_DIVERGENCE


def test_cpp_enum_is_the_registry():
    header = (ROOT / "csrc" / "distill_math.h").read_text()
    first_enum = header[header.index("enum : int {"):]
    enum = dict(re.findall(r"\bk([A-Z]\w*) = (\d+),", first_enum[:first_enum.index("};")]))
    ids = {_snake(name): int(value) for name, value in enum.items() if name not in ("None", "MaxDivergenceId")}
    assert ids == divergences.IDS
    assert int(enum["None"]) == divergences.NO_DIVERGENCE
    bound = re.search(r"kMaxDivergenceId = (\w+)", header)
    assert bound is not None, "csrc/distill_math.h must define kMaxDivergenceId (ops.cpp's bound)"
    assert bound.group(1) in ("kAlphaBeta", str(divergences.MAX_ID))


def test_ids_are_unique_and_contiguous():
    ids = sorted(divergences.IDS.values())
    assert ids == list(range(1, len(ids) + 1))
    assert len(set(divergences.NAMES)) == len(divergences.NAMES)


ENTRY_POINTS = {
    "distill_loss": lambda s, t, **k: distillkit.distill_loss(s, t, **k),
    "reference": lambda s, t, **k: reference.distill_loss(s, t, **k),
    "module": lambda s, t, **k: distillkit.DistillationLoss(**k)(s, t),
    "fused_linear": lambda s, t, **k: distillkit.fused_linear_distill_loss(s, torch.eye(s.shape[-1]), t,
                                                                          torch.eye(t.shape[-1]), **k),
    "vocab_parallel": lambda s, t, **k: distill_loss_vocab_parallel(s, t, **k),
    "trainer_config": lambda s, t, **k: DistillationConfig(**k),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_divergence_name_fails_everywhere(entry):
    s, t = torch.randn(3, 16), torch.randn(3, 16)
    # DistillationConfig's errors are ConfigErrors keyed by the field: "divergence: must be ..."
    with pytest.raises(ValueError, match=r"divergence:? must be one of .*'alpha_beta'.*got 'kl'"):
        ENTRY_POINTS[entry](s, t, divergence="kl")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("value,error,message", [
    ((-0.1, 1.0), ValueError, r"alpha_beta:? must be two finite numbers >= 0, not both 0"),
    ((0.0, 0.0), ValueError, r"not both 0"),
    ((float("nan"), 1.0), ValueError, r"finite"),
    ((0.5,), TypeError, r"alpha_beta must be a pair"),
    (("0.5", 0.5), TypeError, r"alpha_beta\[0\] \(alpha\) must be a Python float"),
])
def test_alpha_beta_is_checked_everywhere(entry, value, error, message):
    s, t = torch.randn(3, 16), torch.randn(3, 16)
    if entry == "trainer_config" and error is TypeError:
        # The config reads YAML: "0.5" is the number 0.5 there, and every config error is a ConfigError
        # (a ValueError) naming the field.
        if isinstance(value[0], str):
            assert DistillationConfig(divergence="alpha_beta", alpha_beta=value).alpha_beta == (0.5, 0.5)
            return
        error, message = ValueError, r"^alpha_beta: must be a pair"
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](s, t, divergence="alpha_beta", alpha_beta=value)


def test_unknown_id_fails_in_the_torch_backend():
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown divergence id 99"):
        torch_rows.forward(s, t, None, 99, 0.0, 0.0, 1.0, -100, False, 8)
    with pytest.raises(ValueError, match="unknown divergence id"):
        divergences.from_id(99)


@pytest.mark.skipif("triton" not in available_backends(), reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_unknown_id_fails_in_the_triton_kernels():
    from distillkit.core.backends import triton_rows

    s, t = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(Exception, match="unknown divergence id"):
        triton_rows.forward(s, t, None, divergences.MAX_ID + 1, 0.0, 0.0, 1.0, -100, False, 8)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("alpha_beta,limit", [((1.0, 0.0), "forward_kl"), ((0.0, 1.0), "reverse_kl")])
def test_alpha_beta_limits_are_the_kls(backend, alpha_beta, limit):
    student, teacher = torch.randn(6, 300) * 3, torch.randn(6, 300) * 3
    results = []
    for options in (dict(divergence="alpha_beta", alpha_beta=alpha_beta), dict(divergence=limit)):
        s = student.clone().requires_grad_()
        loss = distillkit.distill_loss(s, teacher, temperature=1.7, backend=backend, reduction="none", **options)
        loss.sum().backward()
        results.append((loss.detach(), s.grad))
    (ab_loss, ab_grad), (kl_loss, kl_grad) = results
    assert compare(ab_loss, kl_loss.double(), torch.float32, "loss").ok
    assert compare(ab_grad, kl_grad.double(), torch.float32, "grad").ok


def test_alpha_beta_reference_limits_in_float64():
    s, t = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    for alpha_beta, limit in (((1.0, 0.0), "forward_kl"), ((0.0, 1.0), "reverse_kl")):
        ab = reference.divergence_per_token(s, t, divergence="alpha_beta", alpha_beta=alpha_beta, temperature=2.0)
        kl = reference.divergence_per_token(s, t, divergence=limit, temperature=2.0)
        torch.testing.assert_close(ab, kl, rtol=1e-12, atol=1e-12)
    # Between the limits the general formula is continuous: (1, eps) is close to forward KL.
    near = reference.divergence_per_token(s, t, divergence="alpha_beta", alpha_beta=(1.0, 1e-6), temperature=2.0)
    kl = reference.divergence_per_token(s, t, divergence="forward_kl", temperature=2.0)
    torch.testing.assert_close(near, kl, rtol=1e-4, atol=1e-6)
