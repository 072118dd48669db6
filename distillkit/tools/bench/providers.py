"""Who computes the op: distillkit backends, eager PyTorch, torch.compile, and peers when installed.

Every provider builds ``loss_fn(student, teacher, labels) -> scalar loss`` for a Case with the
same semantics: for a divergence op, mean over tokens of T**2 * D(p, q) with p = softmax(t/T),
q = softmax(s/T) (T = cases.TEMPERATURE; jsd with beta = 0.5); for "ce", mean cross-entropy at
temperature 1. A provider that cannot run says why (``unavailable`` returns the reason), and
the benchmark rows record it instead of a number.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ...core import backends, divergences
from .cases import BETA, SKEW, Case

Loss = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]
METRICS = ("time", "memory", "traffic")
_DIVS = divergences.NAMES


@dataclass
class Provider:
    name: str
    kind: str  # "distillkit" | "eager" | "compile" | "peer"
    ops: tuple
    build: Callable[[Case], Loss]
    check: Callable[[str, str], Optional[str]] = field(default=lambda device, metric: None)
    note: str = ""

    def unavailable(self, case: Case, device: str, metric: str) -> Optional[str]:
        """None when this provider can produce `metric` for `case` on `device`, else the reason."""
        if case.op not in self.ops:
            return f"{self.name} does not implement {case.op}"
        return self.check(device, metric)


# -- distillkit ---------------------------------------------------------------------------------

def _distillkit_loss(backend: str) -> Callable[[Case], Loss]:
    import distillkit

    def build(case: Case) -> Loss:
        if case.op == "ce":
            return lambda s, t, y: distillkit.distill_loss(s, None, y, kl_weight=0.0, ce_weight=1.0, backend=backend)
        return lambda s, t, y: distillkit.distill_loss(s, t, divergence=case.op, beta=BETA, skew=SKEW,
                                                       temperature=case.temperature, backend=backend)
    return build


def _backend_check(backend: str) -> Callable[[str, str], Optional[str]]:
    def check(device: str, metric: str) -> Optional[str]:
        if backend == "triton":
            if device == "cpu":
                if metric != "traffic":
                    return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1): no meaningful " \
                           "time or memory; its traffic is counted"
                return None  # traffic runs in a TRITON_INTERPRET=1 subprocess
            return None
        if metric == "traffic" and backend == "cuda":
            return "a CUDA kernel's lanes cannot be counted on the host (count the Triton kernels instead)"
        if metric == "traffic" and backend == "cpu":
            return "the C++ kernel is opaque to both accountings (no interpreter, no ATen ops inside)"
        if backend in ("cpu", "cuda"):
            if device != backend:
                return f"backend {backend!r} runs {backend} tensors only"
            if not backends.native_usable(torch.device(device)):
                return f"backend {backend!r} needs the compiled extension, not built here (see `distillkit env`)"
        return None
    return check


# -- eager PyTorch --------------------------------------------------------------------------------

def _reference_build(case: Case) -> Loss:
    from ...core import reference

    if case.op == "ce":
        return lambda s, t, y: reference.distill_loss(s, None, y, kl_weight=0.0, ce_weight=1.0)
    return lambda s, t, y: reference.distill_loss(s, t, divergence=case.op, beta=BETA, skew=SKEW,
                                                  temperature=case.temperature)


def _eager_build(case: Case) -> Loss:
    """What users write: fp32 log_softmax + F.kl_div (the HF/Hinton recipe), TRL-style JSD, F.cross_entropy."""
    T = case.temperature

    def logprobs(s, t):
        return F.log_softmax(s.float() / T, dim=-1), F.log_softmax(t.float() / T, dim=-1)

    if case.op == "forward_kl":
        def loss(s, t, y):
            log_q, log_p = logprobs(s, t)
            return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * T * T
    elif case.op == "reverse_kl":
        def loss(s, t, y):
            log_q, log_p = logprobs(s, t)
            return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * T * T
    elif case.op == "jsd":
        def loss(s, t, y):
            log_q, log_p = logprobs(s, t)
            log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(torch.tensor(-BETA)),
                                                 log_p + torch.log(torch.tensor(BETA))]), dim=0)
            kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
            kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="batchmean")
            return (BETA * kl_p + (1 - BETA) * kl_q) * T * T
    elif case.op == "tvd":
        def loss(s, t, y):
            log_q, log_p = logprobs(s, t)
            return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1).mean() * T * T
    elif case.op == "ce":
        def loss(s, t, y):
            return F.cross_entropy(s.float(), y)
    else:
        raise ValueError(case.op)
    return loss


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    from ...core import reference

    return torch.compile(reference.distill_loss)


def _compile_build(case: Case) -> Loss:
    fn = _compiled_reference()
    if case.op == "ce":
        return lambda s, t, y: fn(s, None, y, kl_weight=0.0, ce_weight=1.0, check_labels=False)
    return lambda s, t, y: fn(s, t, divergence=case.op, beta=BETA, skew=SKEW, temperature=case.temperature)


def _compile_check(device: str, metric: str) -> Optional[str]:
    if metric == "traffic":
        return "Inductor fuses the graph into generated code that neither accounting sees inside"
    if device == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "torch.compile on CPU needs a C++ compiler"
    return None


# -- peers --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _import_error(module: str, names: tuple = ()) -> Optional[str]:
    try:
        mod = __import__(module, fromlist=list(names) or ["__name__"])
        for name in names:
            getattr(mod, name)
    except Exception as exc:  # ImportError, or a peer's own import-time failure
        return f"{module} not importable: {type(exc).__name__}: {' '.join(str(exc).split())}"[:200]
    return None


@functools.lru_cache(maxsize=None)
def _liger_probe(cls: str) -> Optional[str]:
    """Liger's Triton kernels on CPU tensors: only in the interpreter, and not every one runs there."""
    err = _import_error("liger_kernel.transformers", (cls,))
    if err:
        return err
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return None  # decided by the caller (CPU needs the interpreter)
    try:
        case = Case("forward_kl" if cls == "LigerKLDIVLoss" else "jsd" if cls == "LigerJSD" else "tvd", 2, 64, "fp32")
        s = torch.randn(2, 64, requires_grad=True)
        _LIGER[cls](case)(s, torch.randn(2, 64), None).backward()
    except Exception as exc:
        return f"liger_kernel.{cls} fails in the Triton interpreter: {type(exc).__name__}: {exc}"[:200]
    return None


def _liger_kl(case: Case) -> Loss:
    from liger_kernel.transformers import LigerKLDIVLoss

    T = case.temperature
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    if case.op == "forward_kl":  # Liger takes log-probabilities: log_softmax stays in PyTorch
        return lambda s, t, y: kl(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)) * T * T
    return lambda s, t, y: kl(F.log_softmax(t.float() / T, -1), F.log_softmax(s.float() / T, -1)) * T * T


def _liger_jsd(case: Case) -> Loss:
    from liger_kernel.transformers import LigerJSD

    T = case.temperature
    jsd = LigerJSD(beta=BETA)
    return lambda s, t, y: jsd(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)) * T * T


def _liger_tvd(case: Case) -> Loss:
    from liger_kernel.transformers import LigerTVDLoss

    T = case.temperature
    tvd = LigerTVDLoss(reduction="batchmean")
    return lambda s, t, y: tvd(F.softmax(s.float() / T, -1), F.softmax(t.float() / T, -1)) * T * T


_LIGER = {"LigerKLDIVLoss": _liger_kl, "LigerJSD": _liger_jsd, "LigerTVDLoss": _liger_tvd}


def _liger_build(case: Case) -> Loss:
    return _LIGER[_liger_class(case.op)](case)


def _liger_class(op: str) -> str:
    return {"forward_kl": "LigerKLDIVLoss", "reverse_kl": "LigerKLDIVLoss", "jsd": "LigerJSD",
            "tvd": "LigerTVDLoss"}[op]


class _LigerProvider(Provider):
    def unavailable(self, case: Case, device: str, metric: str) -> Optional[str]:
        reason = super().unavailable(case, device, metric)
        if reason:
            return reason
        err = _import_error("liger_kernel.transformers", (_liger_class(case.op),))
        if err:
            return err
        if device == "cpu":
            if metric != "traffic":
                return "Liger's Triton kernels run CPU tensors only in the Triton interpreter: no meaningful " \
                       "time or memory"
            if os.environ.get("TRITON_INTERPRET", "0") == "1":
                return _liger_probe(_liger_class(case.op))
        return None


def _trl_build(case: Case) -> Loss:
    gkd = _trl_gkd()
    T = case.temperature
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": BETA}[case.op]
    # TRL takes [B, S, V] and its batchmean divides by B: feed [N, 1, V] so that is the token mean.
    # TRL's temperature has no T**2: multiply it in, like every provider here.
    return lambda s, t, y: gkd.generalized_jsd_loss(s.float()[:, None], t.float()[:, None], beta=beta,
                                                    temperature=T) * T * T


def _trl_gkd():
    for module in ("trl.experimental.gkd.gkd_trainer", "trl.trainer.gkd_trainer"):
        try:
            return __import__(module, fromlist=["GKDTrainer"]).GKDTrainer
        except Exception:
            continue
    raise ImportError("no GKDTrainer")


def _trl_check(device: str, metric: str) -> Optional[str]:
    errors = [_import_error(m, ("GKDTrainer",)) for m in ("trl.experimental.gkd.gkd_trainer", "trl.trainer.gkd_trainer")]
    return None if any(e is None for e in errors) else "TRL generalized_jsd_loss: " + errors[0]


def _torchtune_build(case: Case) -> Loss:
    from torchtune.modules.loss import ForwardKLLoss, ReverseKLLoss

    T = case.temperature
    fn = ForwardKLLoss() if case.op == "forward_kl" else ReverseKLLoss()
    # torchtune has no temperature and masks with labels; all tokens valid here. Its "forward KL" is the
    # teacher cross-entropy (KL minus the teacher entropy): same gradient, different value.
    ones = {}

    def loss(s, t, y):
        lab = ones.setdefault(s.shape[0], torch.zeros(s.shape[0], dtype=torch.long, device=s.device))
        return fn(s / T, t / T, lab) * T * T
    return loss


def _torchtune_check(device: str, metric: str) -> Optional[str]:
    return _import_error("torchtune.modules.loss", ("ForwardKLLoss",))


# -- fused linear (hidden states + LM heads in, loss out) -------------------------------------------
# op "fused_linear_jsd": 0.5 * CE + 0.5 * JSD(beta=0.5) at T = 1 (Liger's chunked-loss defaults, no T**2).

def _fused_linear_build(case: Case) -> Loss:
    from ...core.fused_linear import fused_linear_distill_loss

    return lambda h, w, th, tw, y: fused_linear_distill_loss(h, w, th, tw, y, divergence="jsd", beta=BETA,
                                                             kl_weight=0.5, ce_weight=0.5)


def _fused_linear_check(device: str, metric: str) -> Optional[str]:
    if metric == "traffic":
        return "fused-linear traffic is dominated by the matmuls; not counted"
    return _import_error("distillkit.core.fused_linear", ("fused_linear_distill_loss",))


def _eager_linear_build(case: Case) -> Loss:
    from ...core import reference

    def loss(h, w, th, tw, y):
        with torch.no_grad():
            teacher = th @ tw.T
        return reference.distill_loss(h @ w.T, teacher, y, divergence="jsd", beta=BETA, kl_weight=0.5,
                                      ce_weight=0.5)
    return loss


def _liger_chunked_build(case: Case) -> Loss:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=BETA, compiled=False)
    return lambda h, w, th, tw, y: jsd(h, w, th, tw, y)


def _liger_chunked_check(device: str, metric: str) -> Optional[str]:
    if metric == "traffic":
        return "fused-linear traffic is dominated by the matmuls; not counted"
    return _import_error("liger_kernel.chunked_loss", ("LigerFusedLinearJSDLoss",))


def _no_traffic(device: str, metric: str) -> Optional[str]:
    return "fused-linear traffic is dominated by the matmuls; not counted" if metric == "traffic" else None


def fused_linear_providers() -> list[Provider]:
    return [
        Provider("distillkit-fused-linear", "distillkit", ("fused_linear_jsd",), _fused_linear_build,
                 _fused_linear_check, "distillkit.core.fused_linear.fused_linear_distill_loss (backend auto)"),
        Provider("eager-linear", "eager", ("fused_linear_jsd",), _eager_linear_build, _no_traffic,
                 "student/teacher matmuls + distillkit.reference.distill_loss (materializes the logits)"),
        Provider("liger-chunked", "peer", ("fused_linear_jsd",), _liger_chunked_build, _liger_chunked_check,
                 "liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(compiled=False), pure PyTorch chunks"),
    ]


# -- registry -------------------------------------------------------------------------------------

def all_providers() -> list[Provider]:
    out = []
    for backend in ("triton", "torch", "cpu", "cuda"):
        out.append(Provider(f"distillkit-{backend}", "distillkit", _DIVS + ("ce",), _distillkit_loss(backend),
                            _backend_check(backend), f"distillkit.distill_loss(backend={backend!r})"))
    out.append(Provider("reference", "eager", _DIVS + ("ce",), _reference_build,
                        note="distillkit.reference.distill_loss in the input dtype (the readable oracle)"))
    out.append(Provider("eager", "eager", ("forward_kl", "reverse_kl", "jsd", "tvd", "ce"), _eager_build,
                        note="fp32 log_softmax + F.kl_div / TRL-style JSD / F.cross_entropy"))
    out.append(Provider("compile", "compile", _DIVS + ("ce",), _compile_build, _compile_check,
                        note="torch.compile(distillkit.reference.distill_loss)"))
    out.append(_LigerProvider("liger", "peer", ("forward_kl", "reverse_kl", "jsd", "tvd"), _liger_build,
                              note="Liger KLDiv / JSD / TVD on PyTorch log_softmax (its inputs are log-probs)"))
    out.append(Provider("trl", "peer", ("forward_kl", "reverse_kl", "jsd"), _trl_build, _trl_check,
                        note="TRL GKDTrainer.generalized_jsd_loss"))
    out.append(Provider("torchtune", "peer", ("forward_kl", "reverse_kl"), _torchtune_build, _torchtune_check,
                        note="torchtune ForwardKLLoss / ReverseKLLoss (no temperature: logits pre-divided by T)"))
    return out


def get(name: str) -> Provider:
    for provider in all_providers() + fused_linear_providers():
        if provider.name == name:
            return provider
    raise KeyError(f"unknown provider {name!r}; known: {[p.name for p in all_providers()]}")
