"""Forward+backward of forward KL at N=4096, V=32000, fp32 on CPU: the native C++ kernel
(torch.ops.distillkit_ext) vs eager PyTorch vs torch.compile of the same eager code.

    pytest benchmarks/bench_cpu_kernel.py --benchmark-columns=min,median,max,rounds

Each round produces the student gradient from fresh; the loss is batchmean KL(p || q)
with p = softmax(t), q = softmax(s). The gradient is a new 512 MB buffer every round
for all three (its page faults are part of the cost on Linux).

A second group splits the native kernel into its two ops, for fp32 and bf16 logits.
DISTILLKIT_CPU_CAPABILITY=portable (read once per process) times the compiler-vectorized
loops instead of the hand-written AVX-512 ones; DISTILLKIT_CPU_THP=0 leaves the gradient
buffer to 4 KB page faults.
"""

from __future__ import annotations

import pytest
import torch

from distillkit.core.backends import _ext

N, V = 4096, 32000
ROUNDS = 5
pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, V, generator=g), torch.randn(N, V, generator=g)


def eager_loss(student, teacher):
    return torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                      log_target=True, reduction="batchmean")


def _grad_of(loss_fn):
    def step(student, teacher):
        s = student.detach().requires_grad_()
        loss_fn(s, teacher).backward()
        return s.grad
    return step


def native_forward(student, teacher):
    """(div, ce, stats) of forward KL at T = 1, no CE."""
    return torch.ops.distillkit_ext.rows_forward(student, teacher, None, 1, 0.0, 0.0, 1.0, -100, False, V)


def native_backward(student, teacher, stats):
    grad_div = torch.full((N,), 1.0 / N)  # batchmean
    return torch.ops.distillkit_ext.rows_backward(grad_div, torch.zeros(N), student, teacher, None, stats, 1, 0.0,
                                                  0.0, 1.0, -100, False, V)


def native_step(student, teacher):
    return native_backward(student, teacher, native_forward(student, teacher)[2])


STEPS = {
    "native_cpu": lambda: native_step,
    "eager": lambda: _grad_of(eager_loss),
    "torch_compile": lambda: _grad_of(torch.compile(eager_loss)),
}


@pytest.mark.parametrize("impl", list(STEPS))
def test_forward_backward(benchmark, logits, impl):
    student, teacher = logits
    step = STEPS[impl]()
    grad = step(student, teacher)  # warm-up (and compilation)
    expected = (torch.softmax(student, -1) - torch.softmax(teacher, -1)) / N
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-9)
    del grad, expected
    benchmark.group = f"forward_kl fwd+bwd {N}x{V} fp32 cpu ({torch.get_num_threads()} threads)"
    benchmark.pedantic(step, args=(student, teacher), rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("phase", ["forward", "backward", "forward+backward"])
def test_native_phases(benchmark, logits, phase, dtype):
    student, teacher = (x.to(dtype) for x in logits)
    stats = native_forward(student, teacher)[2]
    step = {"forward": lambda: native_forward(student, teacher),
            "backward": lambda: native_backward(student, teacher, stats),
            "forward+backward": lambda: native_step(student, teacher)}[phase]
    benchmark.group = f"native cpu kernel by phase, forward_kl {N}x{V} ({torch.get_num_threads()} threads)"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
