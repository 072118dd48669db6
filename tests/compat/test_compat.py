"""distillkit.compat: TRL's generalized_jsd_loss and torchtune's KD losses on the fused op.

Each loss is checked (value and student gradient) against
- a float64 transcription of the library's formula written here (always runs), and
- the library's own code when it is installed. TRL's GKD trainer module imports `datasets` and
  torchtune's package imports `torchao`; when those are missing, the loss function itself is
  taken from the installed source (TRL: the `generalized_jsd_loss` definition, extracted with ast;
  torchtune: `modules/loss/kd_losses.py`, which imports only torch), else the test is skipped.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from distillkit.compat import torchtune as tt
from distillkit.compat.trl import generalized_jsd_loss, patch_gkd_trainer

B, S, V = 2, 6, 33


def make_inputs(dtype=torch.float32, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, S, V, generator=g) * 2).to(dtype)
    t = (torch.randn(B, S, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    if ignore:
        labels[0, :2] = -100
        labels[1, -1] = -100
    return s, t, labels


def value_and_grad(fn, s, *args, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s, *args, **kwargs)
    out.sum().backward()
    return out.detach(), s.grad


# ----------------------------------------------------------------------------- float64 transcriptions

def trl_f64(s, t, labels=None, beta=0.5, temperature=1.0, reduction="batchmean", num_items_in_batch=None):
    """TRL 1.16 GKDTrainer.generalized_jsd_loss, rewritten with explicit sums in float64."""
    log_q = torch.log_softmax(s.double() / temperature, -1)
    log_p = torch.log_softmax(t.double() / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        jsd = p * (log_p - log_q)  # KL(teacher || student), per element
    elif beta == 1:
        jsd = q * (log_q - log_p)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        jsd = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    if labels is not None:
        jsd = jsd[labels != -100]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        denom = max(int((labels != -100).sum()), 1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def tt_forward_f64(s, t, labels, ignore_index=-100, normalize=True):
    """torchtune ForwardKLLoss: -sum_j p_j log q_j per token, masked, / #tokens."""
    s2, t2 = s.reshape(-1, s.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
    per_token = -(torch.softmax(t2, -1) * torch.log_softmax(s2, -1)).sum(-1)
    mask = (labels.reshape(-1) != ignore_index).double()
    total = (per_token * mask).sum()
    if not normalize:
        return total
    return total / mask.sum() if mask.sum() > 0 else total * 0


def tt_reverse_f64(s, t, labels, ignore_index=-100, normalize=True):
    s2, t2 = s.reshape(-1, s.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
    log_q, log_p = torch.log_softmax(s2, -1), torch.log_softmax(t2, -1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    mask = (labels.reshape(-1) != ignore_index).double()
    total = (per_token * mask).sum()
    if not normalize:
        return total
    return total / mask.sum() if mask.sum() > 0 else total * 0


def close(a, b, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)


# ----------------------------------------------------------------------------- the real libraries

def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _installed_file(package: str, *parts: str):
    """The path of a file inside an installed (not imported) package, or None."""
    root = _package_dir(package)
    path = None if root is None else os.path.join(root, *parts)
    return path if path is not None and os.path.isfile(path) else None


def real_trl_loss():
    """TRL's GKDTrainer.generalized_jsd_loss, or None."""
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
        return GKDTrainer.generalized_jsd_loss
    except Exception:  # noqa: BLE001 - datasets (or another dependency) missing
        pass
    path = _installed_file("trl", "experimental", "gkd", "gkd_trainer.py")
    if path is None:
        return None
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "GKDTrainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "generalized_jsd_loss":
                    item.decorator_list = []
                    module = ast.fix_missing_locations(ast.Module(body=[item], type_ignores=[]))
                    namespace = {"torch": torch, "F": F}
                    exec(compile(module, path, "exec"), namespace)  # noqa: S102 - the installed TRL's code
                    return namespace["generalized_jsd_loss"]
    return None


def real_torchtune():
    """torchtune's kd_losses module, or None."""
    try:
        from torchtune.modules.loss import kd_losses
        return kd_losses
    except Exception:  # noqa: BLE001 - torchao (or another dependency) missing
        pass
    path = _installed_file("torchtune", "modules", "loss", "kd_losses.py")
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("_torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRL = real_trl_loss()
TORCHTUNE = real_torchtune()
needs_trl = pytest.mark.skipif(TRL is None, reason="TRL is not installed (pip install --no-deps trl)")
needs_torchtune = pytest.mark.skipif(TORCHTUNE is None, reason="torchtune is not installed "
                                                                "(pip install --no-deps torchtune)")

# ----------------------------------------------------------------------------- TRL

CASES = [(beta, temperature, reduction, with_labels)
         for beta in (0.0, 0.3, 0.5, 1.0) for temperature in (1.0, 2.0)
         for reduction in ("batchmean", "sum", "mean") for with_labels in (True, False)]


@pytest.mark.parametrize("beta,temperature,reduction,with_labels", CASES)
def test_trl_loss_matches_float64_transcription(beta, temperature, reduction, with_labels):
    s, t, labels = make_inputs()
    lab = labels if with_labels else None
    got, grad = value_and_grad(generalized_jsd_loss, s, t, lab, beta, temperature, reduction)
    want, want_grad = value_and_grad(trl_f64, s.double(), t.double(), lab, beta, temperature, reduction)
    assert got.dtype == torch.float32
    close(got, want)
    close(grad, want_grad)


@pytest.mark.parametrize("beta,temperature,reduction,with_labels", CASES)
@needs_trl
def test_trl_loss_matches_trl(beta, temperature, reduction, with_labels):
    s, t, labels = make_inputs()
    lab = labels if with_labels else None
    got, grad = value_and_grad(generalized_jsd_loss, s, t, lab, beta, temperature, reduction)
    want, want_grad = value_and_grad(TRL, s, t, lab, beta, temperature, reduction)
    close(got, want, rtol=1e-5, atol=1e-6)
    close(grad, want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_num_items_in_batch_overrides_the_reduction(beta):
    s, t, labels = make_inputs()
    n = torch.tensor(7)
    for reduction in ("batchmean", "sum", "mean", "none"):
        got, grad = value_and_grad(generalized_jsd_loss, s, t, labels, beta, 1.5, reduction, n)
        want, want_grad = value_and_grad(trl_f64, s.double(), t.double(), labels, beta, 1.5, reduction, 7)
        close(got, want)
        close(grad, want_grad)
        if TRL is not None:
            close(got, TRL(s, t, labels, beta, 1.5, reduction, n), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_trl_reduction_none_is_the_per_element_tensor(beta, with_labels):
    s, t, labels = make_inputs()
    lab = labels if with_labels else None
    got = generalized_jsd_loss(s, t, lab, beta, 1.0, "none")
    want = trl_f64(s, t, lab, beta, 1.0, "none")
    assert got.shape == want.shape == ((int((labels != -100).sum()), V) if with_labels else (B, S, V))
    close(got, want)
    if TRL is not None:
        close(got, TRL(s, t, lab, beta, 1.0, "none"), rtol=1e-6, atol=1e-7)


def test_trl_beta_endpoints_are_the_kls_not_the_jsd_limit():
    s, t, labels = make_inputs()
    import distillkit
    fkl = distillkit.reference.distill_loss(s.double(), t.double(), kl_weight=(labels != -100).double(),
                                            reduction="sum") / (labels != -100).sum()
    rkl = distillkit.reference.distill_loss(s.double(), t.double(), divergence="reverse_kl",
                                            kl_weight=(labels != -100).double(), reduction="sum") / (labels != -100).sum()
    close(generalized_jsd_loss(s, t, labels, beta=0.0), fkl)
    close(generalized_jsd_loss(s, t, labels, beta=1.0), rkl)
    # Near the endpoints the JSD goes to 0, far from the KLs: TRL's special cases are kept.
    assert generalized_jsd_loss(s, t, labels, beta=1e-4) < 0.01 * fkl


def test_trl_empty_mask():
    s, t, labels = make_inputs()
    labels[:] = -100
    got, grad = value_and_grad(generalized_jsd_loss, s, t, labels, 0.5, 1.0, "batchmean")
    assert got == 0 and torch.all(grad == 0)
    assert torch.isnan(generalized_jsd_loss(s, t, labels, 0.5, 1.0, "mean"))  # torch's mean of an empty tensor
    if TRL is not None:
        assert TRL(s, t, labels, 0.5, 1.0, "batchmean") == 0
        assert torch.isnan(TRL(s, t, labels, 0.5, 1.0, "mean"))


def test_trl_low_precision_keeps_the_input_dtype():
    s, t, labels = make_inputs(torch.bfloat16)
    got = generalized_jsd_loss(s, t, labels, 0.5, 1.0)
    assert got.dtype == torch.bfloat16
    close(got, trl_f64(s, t, labels, 0.5, 1.0), rtol=1e-2, atol=1e-3)


def test_trl_rejects_beta_outside_unit_interval():
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, t, labels, beta=1.5)


class FakeGKDTrainer:
    """The calling convention of TRL's GKDTrainer.compute_loss."""

    beta = 0.3

    @staticmethod
    def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean", num_items_in_batch=None):
        raise AssertionError("the unpatched loss was called")

    def compute_loss(self, s, t, labels, num_items_in_batch=None):
        return self.generalized_jsd_loss(student_logits=s[:, :-1, :], teacher_logits=t[:, :-1, :],
                                         labels=labels[:, 1:], beta=self.beta, num_items_in_batch=num_items_in_batch)


def test_patch_gkd_trainer_instance_and_class():
    s, t, labels = make_inputs()
    want = trl_f64(s[:, :-1], t[:, :-1], labels[:, 1:], 0.3)
    trainer = patch_gkd_trainer(FakeGKDTrainer())
    close(trainer.compute_loss(s, t, labels), want)
    with pytest.raises(AssertionError):  # only that instance was patched
        FakeGKDTrainer().compute_loss(s, t, labels)

    class Sub(FakeGKDTrainer):
        pass

    assert patch_gkd_trainer(Sub) is Sub
    close(Sub().compute_loss(s, t, labels, num_items_in_batch=5), trl_f64(s[:, :-1], t[:, :-1], labels[:, 1:], 0.3,
                                                                          num_items_in_batch=5))
    torch_backend = patch_gkd_trainer(FakeGKDTrainer(), backend="torch")
    close(torch_backend.compute_loss(s, t, labels), want)


def test_patch_gkd_trainer_on_trl_class():
    try:
        from trl.experimental.gkd import GKDTrainer
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"trl.experimental.gkd does not import here ({type(exc).__name__}: {exc})")
    original = GKDTrainer.__dict__["generalized_jsd_loss"]
    try:
        patch_gkd_trainer()
        assert GKDTrainer.generalized_jsd_loss is generalized_jsd_loss
    finally:
        GKDTrainer.generalized_jsd_loss = original


# ----------------------------------------------------------------------------- torchtune

TT_CASES = [("ForwardKLLoss", tt_forward_f64), ("ReverseKLLoss", tt_reverse_f64)]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name,reference", TT_CASES)
def test_torchtune_losses_match_float64_transcription(name, reference, normalize):
    s, t, labels = make_inputs()
    loss = getattr(tt, name)()
    got, grad = value_and_grad(loss, s, t, labels, normalize)
    want, want_grad = value_and_grad(reference, s.double(), t.double(), labels, normalize=normalize)
    assert got.dtype == torch.float32
    close(got, want)
    close(grad, want_grad)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_torchtune_symmetric_matches_float64_transcription(ratio):
    s, t, labels = make_inputs()
    got, grad = value_and_grad(tt.SymmetricKLLoss(sym_kd_ratio=ratio), s, t, labels)

    def reference(x, y, lab):
        return ratio * tt_forward_f64(x, y, lab) + (1 - ratio) * tt_reverse_f64(x, y, lab)

    want, want_grad = value_and_grad(reference, s.double(), t.double(), labels)
    close(got, want)
    close(grad, want_grad)
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        tt.SymmetricKLLoss(sym_kd_ratio=1.5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name,kwargs", [("ForwardKLLoss", {}), ("ReverseKLLoss", {}),
                                         ("SymmetricKLLoss", {"sym_kd_ratio": 0.3})])
@needs_torchtune
def test_torchtune_losses_match_torchtune(name, kwargs, normalize):
    s, t, labels = make_inputs()
    ours, theirs = getattr(tt, name)(**kwargs), getattr(TORCHTUNE, name)(**kwargs)
    # torchtune documents [B*S, V] logits with [B, S] labels; both layouts are accepted.
    for shape in ((B, S, V), (B * S, V)):
        got, grad = value_and_grad(ours, s.reshape(shape), t.reshape(shape), labels, normalize)
        want, want_grad = value_and_grad(theirs, s.reshape(shape), t.reshape(shape), labels, normalize)
        close(got, want, rtol=1e-5, atol=1e-6)
        close(grad, want_grad, rtol=1e-4, atol=1e-7)


CHUNKED = [("ForwardKLWithChunkedOutputLoss", {}, tt_forward_f64),
           ("ReverseKLWithChunkedOutputLoss", {}, tt_reverse_f64),
           ("SymmetricKLWithChunkedOutputLoss", {"sym_kd_ratio": 0.7}, None)]


def chunks(x, n):
    return list(x.chunk(n, dim=1))


@pytest.mark.parametrize("name,kwargs,reference", CHUNKED)
def test_torchtune_chunked_losses(name, kwargs, reference):
    s, t, labels = make_inputs()
    n = 3
    loss = getattr(tt, name)(num_output_chunks=n, **kwargs)
    leaf = s.detach().clone().requires_grad_(True)
    got = loss(chunks(leaf, n), chunks(t, n), labels)
    got.backward()
    if reference is None:
        def reference(x, y, lab):
            return 0.7 * tt_forward_f64(x, y, lab) + 0.3 * tt_reverse_f64(x, y, lab)
    want, want_grad = value_and_grad(reference, s.double(), t.double(), labels)
    close(got, want)
    close(leaf.grad, want_grad)
    if TORCHTUNE is not None:
        leaf2 = s.detach().clone().requires_grad_(True)
        theirs = getattr(TORCHTUNE, name)(num_output_chunks=n, **kwargs)(chunks(leaf2, n), chunks(t, n), labels)
        theirs.backward()
        close(got, theirs, rtol=1e-5, atol=1e-6)
        close(leaf.grad, leaf2.grad, rtol=1e-4, atol=1e-7)


def test_torchtune_all_ignored():
    s, t, labels = make_inputs()
    labels[:] = -100
    for name in ("ForwardKLLoss", "ReverseKLLoss"):
        got, grad = value_and_grad(getattr(tt, name)(), s, t, labels)
        assert got == 0 and torch.all(grad == 0)
        if TORCHTUNE is not None:
            assert getattr(TORCHTUNE, name)()(s, t, labels) == 0
    assert tt.ForwardKLWithChunkedOutputLoss(2)(chunks(s, 2), chunks(t, 2), labels) == 0
    assert torch.isnan(tt.ReverseKLWithChunkedOutputLoss(2)(chunks(s, 2), chunks(t, 2), labels))
    if TORCHTUNE is not None:
        assert TORCHTUNE.ForwardKLWithChunkedOutputLoss(2)(chunks(s, 2), chunks(t, 2), labels) == 0
        assert torch.isnan(TORCHTUNE.ReverseKLWithChunkedOutputLoss(2)(chunks(s, 2), chunks(t, 2), labels))


def test_torchtune_forward_with_masked_teacher_vocabulary():
    s, t, labels = make_inputs()
    t[..., -5:] = float("-inf")  # p = 0 there: no term, in both
    got, grad = value_and_grad(tt.ForwardKLLoss(), s, t, labels)
    want, want_grad = value_and_grad(tt_forward_f64, s.double(), t.double(), labels)
    close(got, want)
    close(grad, want_grad)
    if TORCHTUNE is not None:
        close(got, TORCHTUNE.ForwardKLLoss()(s, t, labels), rtol=1e-5, atol=1e-6)


def test_torchtune_custom_ignore_index_and_bf16():
    s, t, labels = make_inputs(torch.bfloat16)
    labels[labels == -100] = 7
    labels[0, 0] = -1
    got = tt.ForwardKLLoss(ignore_index=-1)(s, t, labels)
    assert got.dtype == torch.float32
    close(got, tt_forward_f64(s, t, labels, ignore_index=-1), rtol=1e-4, atol=1e-5)
