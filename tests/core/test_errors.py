"""Bad input gets a clear error that names the argument, and nothing is written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import distillkit
from distillkit.core import reference

V = 1271


def good_args():
    return dict(student_logits=torch.randn(4, V, requires_grad=True), teacher_logits=torch.randn(4, V),
                labels=torch.randint(0, V, (4,)))


BAD_CASES = [
    ("student_logits", dict(student_logits=torch.randint(0, 3, (4, V))), TypeError),
    ("teacher_logits", dict(teacher_logits=torch.randint(0, 3, (4, V))), TypeError),
    ("teacher_logits has vocabulary size", dict(teacher_logits=torch.randn(4, V + 1)), ValueError),
    ("leading shape", dict(teacher_logits=torch.randn(5, V)), ValueError),
    ("labels has shape", dict(labels=torch.zeros(5, dtype=torch.long)), ValueError),
    ("labels must be an integer", dict(labels=torch.zeros(4)), TypeError),
    ("labels contains", dict(labels=torch.tensor([0, 1, V, 2])), ValueError),
    ("temperature", dict(temperature=0.0), ValueError),
    ("temperature", dict(temperature=-1.0), ValueError),
    ("beta", dict(divergence="jsd", beta=1.0), ValueError),
    ("beta", dict(beta=0.0), ValueError),
    ("skew", dict(skew=1.0), ValueError),
    ("divergence", dict(divergence="kl"), ValueError),
    ("reduction", dict(reduction="avg"), ValueError),
    ("backend", dict(backend="tpu"), ValueError),
    ("kl_weight", dict(kl_weight=torch.ones(3)), ValueError),
    ("ce_weight", dict(ce_weight=torch.ones(4, 2)), ValueError),
    ("ce_weight is non-zero but labels is None", dict(labels=None, ce_weight=1.0), ValueError),
    ("teacher_logits is None", dict(teacher_logits=None), ValueError),
    ("normalizer", dict(normalizer=torch.ones(2)), ValueError),
    ("normalizer", dict(normalizer=0.0), ValueError),
]


@pytest.mark.parametrize("impl", [distillkit.distill_loss, reference.distill_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("message,override,error", BAD_CASES, ids=[c[0][:24] for c in BAD_CASES])
def test_bad_input_names_the_argument(impl, message, override, error):
    args = good_args()
    args.update(override)
    kwargs = {k: v for k, v in args.items() if k not in ("student_logits", "teacher_logits", "labels")}
    if "labels contains" in message or "ce_weight" in message:
        kwargs.setdefault("ce_weight", 1.0)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=message):
        impl(args["student_logits"], args["teacher_logits"], args["labels"], **kwargs)
    for name, before in snapshot.items():
        assert torch.equal(args[name], before), f"{name} was modified"
    student = args["student_logits"]
    assert not isinstance(student, torch.Tensor) or student.grad is None


def test_triton_on_cpu_without_interpreter_is_refused():
    """The interpreter is chosen at import, so check in a fresh process without it."""
    code = (
        "import torch, distillkit\n"
        "try:\n"
        "    distillkit.distill_loss(torch.randn(2, 8), torch.randn(2, 8), backend='triton')\n"
        "except ValueError as e:\n"
        "    print('REFUSED', e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "REFUSED" in out.stdout and "backend='triton'" in out.stdout, out.stdout + out.stderr


def test_native_backend_without_extension_is_refused(monkeypatch):
    from distillkit.core import backends

    monkeypatch.setattr(backends, "native_usable", lambda device: False)
    with pytest.raises(ValueError, match="backend='cpu'"):
        distillkit.distill_loss(torch.randn(2, 8), torch.randn(2, 8), backend="cpu")
