"""Logits-free distillation: the loss of `distill_loss` straight from hidden states and LM-head weights.

The [N, V] student and teacher logits are never materialized at once. Token rows are processed in
chunks; per chunk the op computes the student and teacher logits (two matmuls, the teacher's with no
gradient), runs the fused row op (`distill_rows`), and, in the same loop, turns the chunk's logits
gradient (`distill_rows_backward`) into its contributions to the hidden-state, weight and bias
gradients (two matmuls). The chunk's logits are then dropped.

How the gradient is known before the backward: the loss is linear in the per-row terms,

    loss = sum_r coef_div[r] * D[r] + coef_ce[r] * ce[r]        (reduction "mean" / "sum")

where coef_div = kl_weight * T**2 / denominator and coef_ce = ce_weight / denominator depend on the
per-token weights, the reduction and the normalizer only, never on the logits. The public function
computes these coefficients with ordinary (differentiable) tensor ops and hands them to the op, which
returns the scalar loss and, already in its forward, the gradient of that scalar w.r.t. hidden,
weight and bias for grad_output = 1. The backward then only scales them by grad_output and returns
d loss / d coef = grad_output * (D, ce), through which autograd reaches per-token weight tensors and a
tensor normalizer. For reduction="none" the loss is per row, grad_output is a [N] tensor that the
forward cannot anticipate, so the backward runs the chunk loop again (a second custom op) with
per-row coefficients grad_output * coef.

Memory: chunk logits (one buffer each, reused by every chunk), chunk gradient (on CPU the C++ kernel
writes it over the student's chunk logits: backends/cpu_fused.py), the fp32 hidden-gradient [N, H] and
weight-gradient [V, H] buffers; no [N, V] tensor. Everything is a custom op (opaque to torch.compile,
fake implementations for shape propagation). Rows with no active term (coefficients both 0: prompts,
tool output) skip both GEMMs and the row op (`row_compaction.py`): that costs the one host-device
synchronization of an eager call (the optional label range check aside); under torch.compile nothing is
compacted or synchronized.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks, backends, divergences
from .backends import cpu_fused
from .ops import input_gradients  # also registers torch.ops.distillkit.distill_rows*
from ._checks import Weight, is_literal_zero
from .divergences import NO_DIVERGENCE
from .dtensor import full_heads
from .logit_transform import check_transform, transform_grad, transform_logits
from .row_compaction import active_rows, loss_coefficients, put_rows, take_rows
from ._reduce import mask_ignored_tokens, valid_labels
from .vocab import check_policy, shared_vocab_size

# Bytes of chunk temporaries per token row, in units of V: student logits + their gradient (input
# dtype), teacher logits (teacher dtype), and about four fp32 rows of temporaries inside a backend.
_FP32_TEMPS_PER_ROW = 4


def default_chunk_size(vocab: int, teacher_vocab: int, elem: int, teacher_elem: int, max_chunk_bytes: int,
                       in_place: bool = False) -> int:
    """The most token rows whose chunk temporaries fit in max_chunk_bytes (at least 1). Independent of the
    number of rows, so that torch.compile does not specialize on it. in_place: the C++ CPU kernel's fused op
    (backends/cpu_fused.py) runs the rows; the chunk logits (their fp32 copy too) are its only temporaries."""
    student = elem + (4 if elem != 4 else 0) if in_place else 2 * elem + 4 * _FP32_TEMPS_PER_ROW
    per_row = vocab * student + teacher_vocab * teacher_elem
    return int(max(1, max_chunk_bytes // max(per_row, 1)))


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result, accumulated in fp32. CUDA multiplies bf16/fp16 operands with an fp32
    output; elsewhere they are upcast (CPU low-precision matmuls round partial sums)."""
    if a.dtype == b.dtype == torch.float32:
        return torch.mm(a, b)
    if a.device.type == "cuda" and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=)
            return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


def _linear_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], buffer: list, rows: int) -> Tensor:
    """F.linear(x, weight, bias) (its call: addmm with a bias, else mm) into the first rows of buffer[0], a
    [rows, V] buffer made by a loop's first chunk: on CPU, paging in a fresh output per chunk cost as much as
    the row op (docs/PERFORMANCE.md)."""
    if not buffer:
        buffer.append(torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device))
    out = buffer[0][:x.shape[0]]
    return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)


def _rows_and_grad(s: Tensor, t: Optional[Tensor], y: Optional[Tensor], g_div: Tensor, g_ce: Tensor,
                   div_id: int, param_a: float, param_b: float, temperature: float, ignore_index: int, with_ce: bool,
                   backend: str, need_grad: bool, overwrite: bool = False):
    """(D, ce, d(sum g_div D + g_ce ce)/ds) for one chunk of logits. t may cover only the first Vm <= V ids
    (vocab_mismatch="truncate"): D is then over those ids on both sides, ce over the student's V. overwrite: s
    is scratch, which the C++ CPU kernel's fused op turns into the gradient (backends/cpu_fused.py)."""
    div_vocab = s.shape[-1] if t is None else t.shape[-1]
    if need_grad and overwrite and cpu_fused.usable(backend, s):
        d, e = cpu_fused.forward_backward_(g_div, g_ce, s, t, y, div_id, param_a, param_b, temperature, ignore_index,
                                           with_ce, div_vocab)
        return d, e, s
    opts = (div_id, param_a, param_b, temperature, ignore_index, with_ce, div_vocab, backend)
    d, e, stats = torch.ops.distillkit.distill_rows(s, t, y, *opts)
    grad = torch.ops.distillkit.distill_rows_backward(g_div, g_ce, s, t, y, stats, *opts) if need_grad else None
    return d, e, grad


def dense_row_terms(t_hidden, t_weight, t_bias, labels, div_id, param_a, param_b, temperature, ignore_index,
                    with_ce, backend, teacher_scale: float = 1.0, teacher_softcap: float = 0.0,
                    student_scratch: bool = False):
    """The row terms of chunk_loop against a dense teacher: its chunk logits from its hidden states and head
    (with the teacher's logit transform)."""
    buffer = []  # the teacher's chunk logits (_linear_into)

    def row_terms(rows: slice, s: Tensor, g_div: Tensor, g_ce: Tensor, need_grad: bool):
        t = None
        if div_id != NO_DIVERGENCE:
            t = transform_logits(_linear_into(t_hidden[rows], t_weight, t_bias, buffer, s.shape[0]), teacher_scale,
                                 teacher_softcap)
        y = labels[rows] if with_ce else None
        return _rows_and_grad(s, t, y, g_div, g_ce, div_id, param_a, param_b, temperature, ignore_index, with_ce,
                              backend, need_grad, student_scratch)
    return row_terms


def chunk_loop(hidden, weight, bias, row_terms, g_div, g_ce, chunk_size, grad_weight_fp32,
               need_hidden, need_weight, need_bias, scale: float = 1.0, softcap: float = 0.0):
    """Per-row (D, ce) and the gradients of sum_r g_div[r] D[r] + g_ce[r] ce[r] w.r.t. hidden/weight/bias.
    row_terms(rows, chunk logits, g_div[rows], g_ce[rows], need_grad) -> (D, ce, d/d logits) is the row op
    against the teacher (dense_row_terms here; the top-k teacher in distillkit/sparse/fused_linear_topk.py).
    scale, softcap: the student's logit transform (transform_logits), applied to each chunk and chained into
    its gradient."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    div = torch.zeros(n, dtype=torch.float32, device=dev)
    ce = torch.zeros(n, dtype=torch.float32, device=dev)
    need_grad = need_hidden or need_weight or need_bias
    grad_h = torch.empty((n, h) if need_hidden else (0,), dtype=torch.float32, device=dev)  # each chunk its rows
    gw_dtype = torch.float32 if grad_weight_fp32 else weight.dtype
    direct_w = need_weight and weight.dtype == gw_dtype == torch.float32 and n > 0  # chunk 0 writes, no zero fill
    grad_w = (torch.empty if direct_w else torch.zeros)((vocab, h) if need_weight else (0,), dtype=gw_dtype, device=dev)
    grad_b = torch.zeros((vocab,) if need_bias else (0,), dtype=torch.float32, device=dev)
    # Off CUDA (where low-precision matmuls round partial sums), bf16/fp16 chunk logits go to the row op
    # as fp32 (exactly the same values) so that their gradient stays fp32, and the hidden gradient
    # multiplies by an fp32 copy of the weight, made once. On CUDA the logits gradient is materialized
    # in the input dtype, like an unfused model's, and multiplied with fp32 accumulation and output.
    upcast = weight.dtype != torch.float32 and dev.type != "cuda"
    weight_for_grad = weight.float() if upcast and need_hidden else weight
    buffer = []  # the student's chunk logits (_linear_into); the C++ CPU kernel turns them into g in place
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            x = hidden[rows]
            s = _linear_into(x, weight, bias, buffer, min(chunk_size, n))
            s = transform_logits(s.float() if upcast else s, scale, softcap)
            d, e, g = row_terms(rows, s, g_div[rows], g_ce[rows], need_grad)
            div[rows], ce[rows] = d, e
            if need_grad:
                g = transform_grad(g, s, scale, softcap)
            del s
            if need_hidden:
                if g.dtype == weight_for_grad.dtype == torch.float32:
                    torch.mm(g, weight_for_grad, out=grad_h[rows])
                else:
                    grad_h[rows] = _mm_fp32(g, weight_for_grad)
            if need_weight:
                if direct_w and start == 0:
                    torch.mm(g.t(), x, out=grad_w)
                elif g.dtype == x.dtype == gw_dtype:  # fp32 (or low precision without fp32 accumulation)
                    grad_w.addmm_(g.t(), x)
                elif grad_weight_fp32:
                    grad_w += _mm_fp32(g.t(), x)
                else:
                    grad_w.addmm_(g.t().to(gw_dtype), x)
            if need_bias:
                grad_b += g.float().sum(0)
    return div, ce, grad_h, grad_w, grad_b


# -- custom ops -------------------------------------------------------------------------------------

@torch.library.custom_op("distillkit::fused_linear_distill", mutates_args=())
def fused_linear_distill(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], t_hidden: Optional[Tensor],
    t_weight: Optional[Tensor], t_bias: Optional[Tensor], labels: Optional[Tensor],
    coef_div: Tensor, coef_ce: Tensor, divergence: int, param_a: float, param_b: float, temperature: float,
    ignore_index: int, with_ce: bool, backend: str, chunk_size: int, reduce: bool, grad_weight_fp32: bool,
    need_hidden: bool, need_weight: bool, need_bias: bool, student_scale: float = 1.0, student_softcap: float = 0.0,
    teacher_scale: float = 1.0, teacher_softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, D [N], ce [N], grad_hidden, grad_weight, grad_bias).

    hidden [N, H], weight [V, H], t_hidden [N, Ht], t_weight [Vm, Ht] with Vm <= V, coef_* [N] fp32.
    loss = sum_r coef_div D + coef_ce ce (0-dim) when reduce, else per row [N]. The three gradients are
    those of the reduced loss for grad_output = 1 (fp32; grad_weight in the weight dtype when not
    grad_weight_fp32), computed only when reduce and requested, else empty.
    """
    grads = reduce and (need_hidden or need_weight or need_bias)
    row_terms = dense_row_terms(t_hidden, t_weight, t_bias, labels, divergence, param_a, param_b, temperature,
                                ignore_index, with_ce, backend, teacher_scale, teacher_softcap, student_softcap == 0.0)
    div, ce, gh, gw, gb = chunk_loop(hidden, weight, bias, row_terms, coef_div, coef_ce, chunk_size, grad_weight_fp32,
                                     grads and need_hidden, grads and need_weight, grads and need_bias, student_scale,
                                     student_softcap)
    return combine_rows(coef_div, div, coef_ce, ce, reduce), div, ce, gh, gw, gb


def combine_rows(coef_div: Tensor, div: Tensor, coef_ce: Tensor, ce: Tensor, reduce: bool) -> Tensor:
    """sum_r coef_div D + coef_ce ce (or per row); a zero coefficient keeps its row at 0 even if D is inf."""
    rows = torch.where(coef_div != 0, coef_div * div, 0.0) + torch.where(coef_ce != 0, coef_ce * ce, 0.0)
    return rows.sum() if reduce else rows


def grad_shapes(hidden, weight, reduce, grad_weight_fp32, need_hidden, need_weight, need_bias):
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (hidden.new_empty((n, h) if reduce and need_hidden else (0,), **f32),
            hidden.new_empty((v, h) if reduce and need_weight else (0,),
                             dtype=torch.float32 if grad_weight_fp32 else weight.dtype, device=hidden.device),
            hidden.new_empty((v,) if reduce and need_bias else (0,), **f32))


def fake_outputs(hidden, weight, reduce, grad_weight_fp32, need_hidden, need_weight, need_bias):
    """The shapes of a fused-linear op's (loss, D, ce, grad_hidden, grad_weight, grad_bias)."""
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = hidden.new_empty((), **f32) if reduce else hidden.new_empty((n,), **f32)
    return (loss, hidden.new_empty((n,), **f32), hidden.new_empty((n,), **f32),
            *grad_shapes(hidden, weight, reduce, grad_weight_fp32, need_hidden, need_weight, need_bias))


@fused_linear_distill.register_fake
def _(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, coef_div, coef_ce, divergence, param_a, param_b,
      temperature, ignore_index, with_ce, backend, chunk_size, reduce, grad_weight_fp32, need_hidden,
      need_weight, need_bias, student_scale=1.0, student_softcap=0.0, teacher_scale=1.0, teacher_softcap=0.0):
    return fake_outputs(hidden, weight, reduce, grad_weight_fp32, need_hidden, need_weight, need_bias)


@torch.library.custom_op("distillkit::fused_linear_distill_backward", mutates_args=())
def fused_linear_distill_backward(
    grad_div: Tensor, grad_ce: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    t_hidden: Optional[Tensor], t_weight: Optional[Tensor], t_bias: Optional[Tensor], labels: Optional[Tensor],
    divergence: int, param_a: float, param_b: float, temperature: float, ignore_index: int, with_ce: bool, backend: str,
    chunk_size: int, grad_weight_fp32: bool, need_hidden: bool, need_weight: bool, need_bias: bool,
    student_scale: float = 1.0, student_softcap: float = 0.0, teacher_scale: float = 1.0,
    teacher_softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_r grad_div[r] D[r] + grad_ce[r] ce[r] (recomputes the chunks' logits)."""
    row_terms = dense_row_terms(t_hidden, t_weight, t_bias, labels, divergence, param_a, param_b, temperature,
                                ignore_index, with_ce, backend, teacher_scale, teacher_softcap, student_softcap == 0.0)
    _, _, gh, gw, gb = chunk_loop(hidden, weight, bias, row_terms, grad_div, grad_ce, chunk_size, grad_weight_fp32,
                                  need_hidden, need_weight, need_bias, student_scale, student_softcap)
    return gh, gw, gb


@fused_linear_distill_backward.register_fake
def _(grad_div, grad_ce, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, divergence, param_a, param_b,
      temperature, ignore_index, with_ce, backend, chunk_size, grad_weight_fp32, need_hidden, need_weight,
      need_bias, student_scale=1.0, student_softcap=0.0, teacher_scale=1.0, teacher_softcap=0.0):
    return grad_shapes(hidden, weight, True, grad_weight_fp32, need_hidden, need_weight, need_bias)


def save_for_fused_backward(ctx, inputs, output, reduce: bool, options: tuple, transforms: tuple = ()) -> None:
    """The autograd context of a fused-linear op (this one, distillkit::fused_linear_topk): its inputs start
    with (hidden, weight, bias, three teacher tensors, labels, coef_div, coef_ce), in the order of its
    backward op's, and its outputs are (loss, D, ce, grad_hidden, grad_weight, grad_bias)."""
    hidden, weight, bias = inputs[:3]
    _, div, ce, gh, gw, gb = output
    ctx.reduce, ctx.options, ctx.transforms = reduce, options, tuple(transforms)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.has_bias = bias is not None
    if reduce:
        ctx.save_for_backward(div, ce, gh, gw, gb)
    else:  # the backward op recomputes the chunks from the inputs
        ctx.save_for_backward(div, ce, inputs[7], inputs[8], *inputs[:7])
    ctx.mark_non_differentiable(div, ce, gh, gw, gb)
    ctx.set_materialize_grads(False)  # no zero [V, H] gradient for the unused grad_weight output


def fused_backward(ctx, grad_loss, op, backward_op):
    """The input gradients of fused-linear op `op`: the forward's gradients times grad_output (reduced), or
    `backward_op` with per-row coefficients grad_output * coef (reduction "none"); grad_output * (D, ce) for the
    coefficients."""
    need = ctx.needs_input_grad
    if ctx.reduce:
        div, ce, gh, gw, gb = ctx.saved_tensors
        if not cpu_fused.is_one(grad_loss):  # loss.backward() on CPU: no [V, H] product to allocate
            gh, gw, gb = grad_loss * gh, grad_loss * gw, grad_loss * gb
    else:
        div, ce, coef_div, coef_ce, *inputs = ctx.saved_tensors
        g_div = torch.where(coef_div != 0, grad_loss * coef_div, 0.0)
        g_ce = torch.where(coef_ce != 0, grad_loss * coef_ce, 0.0)
        gh, gw, gb = backward_op(g_div, g_ce, *inputs, *ctx.options, bool(need[0]), bool(need[1]),
                                 bool(ctx.has_bias and need[2]), *ctx.transforms)
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    return input_gradients(
        op, hidden=gh.to(h_dtype) if need[0] else None, weight=gw.to(w_dtype) if need[1] else None,
        bias=gb.to(b_dtype) if ctx.has_bias and need[2] else None,
        coef_div=grad_loss * div if need[7] else None, coef_ce=grad_loss * ce if need[8] else None)


def _setup_context(ctx, inputs, output):
    (*_, divergence, param_a, param_b, temperature, ignore_index, with_ce, backend, chunk_size, reduce,
     grad_weight_fp32, _need_h, _need_w, _need_b, s_scale, s_cap, t_scale, t_cap) = inputs  # the defaults filled in
    save_for_fused_backward(ctx, inputs, output, reduce, (divergence, param_a, param_b, temperature, ignore_index,
                                                          with_ce, backend, chunk_size, grad_weight_fp32),
                            (s_scale, s_cap, t_scale, t_cap))


def _backward(ctx, grad_loss, *_unused):
    return fused_backward(ctx, grad_loss, fused_linear_distill, fused_linear_distill_backward)


fused_linear_distill.register_autograd(_backward, setup_context=_setup_context)


# -- public function --------------------------------------------------------------------------------

def check_linear(name_h: str, hidden, name_w: str, weight, name_b: str, bias) -> None:
    _checks.check_logits(name_h, hidden)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name_w} must be a 2-D tensor [V, H]")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name_w} has shape {tuple(weight.shape)} but {name_h} has hidden size "
                         f"{hidden.shape[-1]}; expected [V, {hidden.shape[-1]}]")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{name_w} ({weight.dtype}, {weight.device}) must have the dtype and device of "
                         f"{name_h} ({hidden.dtype}, {hidden.device})")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype
                             or bias.device != hidden.device):
        raise ValueError(f"{name_b} must be a [{weight.shape[0]}] tensor of {hidden.dtype} on {hidden.device}; "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")


def fused_linear_distill_loss(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], labels: Optional[Tensor] = None, *,
    student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
    divergence: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
    alpha_beta: tuple[float, float] = (0.5, 0.5), temperature: float = 1.0,
    temperature_scaling: bool = True, kl_weight: Weight = 1.0, ce_weight: Weight = 0.0,
    ignore_index: int = -100, reduction: str = "mean", normalizer=None, backend: str = "auto",
    check_labels: bool = True, vocab_mismatch: str = "error", chunk_size: Optional[int] = None,
    max_chunk_bytes: int = 256 * 2**20, grad_weight_fp32: bool = True, divergence_on_ignored: bool = False,
    student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None, compact_rows: bool = True,
) -> Tensor:
    """`distill_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T +
    teacher_bias, labels, ...)` without materializing the [N, V] logits.

    Args:
        student_hidden: [..., H] float32/float16/bfloat16 final hidden states; receives a gradient.
        student_weight: [V, H] LM head (same dtype); receives a gradient. student_bias: [V] or None.
        teacher_hidden, teacher_weight, teacher_bias: [..., Ht], [Vt, Ht], [Vt] or None; constants. May be
            None when kl_weight == 0.0 (CE only).
        labels, divergence, beta, skew, alpha_beta, temperature, temperature_scaling, kl_weight, ce_weight,
        ignore_index, reduction, normalizer, backend, check_labels, divergence_on_ignored: exactly as in
            `distillkit.distill_loss` (by default a token whose label is ignore_index takes part in no term).
        vocab_mismatch: "error" (Vt != V raises) | "truncate" (the divergence compares the distributions over
            the shared first min(V, Vt) ids; CE keeps the student's full vocabulary). See distillkit.core.vocab.
        chunk_size: token rows per chunk; default: the most that keep the chunk temporaries within
            max_chunk_bytes.
        grad_weight_fp32: accumulate the LM-head gradient over chunks in fp32 (default; returned in the weight
            dtype) or directly in the weight dtype (saves V * H * 2 bytes for bf16 weights, less exact).
        student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap: models that transform their
            head's output: logits = softcap * tanh(scale * (h W^T + b) / softcap), or scale * (h W^T + b) without
            a softcap (Gemma 2/3: softcap = final_logit_softcapping; Cohere: scale = logit_scale; Granite:
            scale = 1 / logits_scaling). Applied per chunk, in fp32, with the exact gradient.
        compact_rows: run only the rows with a non-zero divergence or CE coefficient (same results; the others
            get exactly 0 gradient). One host-device synchronization per call finds them; False (or
            torch.compile) runs every row with none.
    Returns:
        The loss in float32: a scalar, or the leading shape for reduction="none".
    """
    options = _checks.check_options(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                                    temperature=temperature, reduction=reduction, backend=backend)
    transforms = (*check_transform("student", student_logit_scale, student_softcap),
                  *check_transform("teacher", teacher_logit_scale, teacher_softcap))
    check_policy(vocab_mismatch)
    # DTensor heads (FSDP2, TP) gathered once, the student's with an averaged gradient (core/dtensor.py).
    student_weight, student_bias, teacher_weight, teacher_bias = full_heads(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    check_linear("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    lead, hidden_size = student_hidden.shape[:-1], student_hidden.shape[-1]
    vocab, device = student_weight.shape[0], student_hidden.device
    _checks.check_weight("kl_weight", kl_weight, lead, device)
    _checks.check_weight("ce_weight", ce_weight, lead, device)
    _checks.check_normalizer(normalizer)
    with_div = not is_literal_zero(kl_weight)
    with_ce = labels is not None and not is_literal_zero(ce_weight)
    if labels is None and not is_literal_zero(ce_weight):
        raise ValueError("ce_weight is non-zero but labels is None: pass labels for the CE term")
    if vocab == 0:
        raise ValueError("student_weight has an empty vocabulary dimension")
    if with_div:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden/teacher_weight is None: pass the teacher, or kl_weight=0.0 for CE only")
        check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias",
                      teacher_bias)
        if teacher_hidden.shape[:-1] != lead or teacher_hidden.device != device:
            raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} on "
                             f"{teacher_hidden.device} does not match student_hidden {tuple(lead)} on {device}")
        vm = shared_vocab_size(vocab, teacher_weight.shape[0], vocab_mismatch)
        if teacher_weight.shape[0] > vm:  # the teacher's extra ids are never computed
            teacher_weight = teacher_weight[:vm]
            teacher_bias = None if teacher_bias is None else teacher_bias[:vm]
    else:
        teacher_hidden = teacher_weight = teacher_bias = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
            raise TypeError("labels must be an integer tensor (int64)")
        if labels.shape != lead:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but must match the leading shape "
                             f"{tuple(lead)} of student_hidden")
        if with_ce and check_labels and not torch.compiler.is_compiling():
            _checks.check_label_range(labels, vocab, ignore_index)

    valid = valid_labels(labels, vocab, ignore_index) if labels is not None else None
    kl_weight = mask_ignored_tokens(kl_weight, valid, divergence_on_ignored) if with_div else kl_weight
    n = lead.numel()
    coef_div, coef_ce = loss_coefficients(kl_weight if with_div else 0.0, ce_weight if with_ce else 0.0, valid, lead,
                                          device, temperature=temperature, temperature_scaling=temperature_scaling,
                                          reduction=reduction, normalizer=normalizer)
    backend = backends.resolve(backend, device, student_hidden.dtype)
    if chunk_size is None:
        t_elem = teacher_hidden.element_size() if with_div else 0
        t_vocab = teacher_weight.shape[0] if with_div else 0
        in_place = cpu_fused.available(backend, device) and transforms == (1.0, 0.0, 1.0, 0.0)
        chunk_size = default_chunk_size(vocab, t_vocab, student_hidden.element_size(), t_elem, max_chunk_bytes,
                                        in_place)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")

    rows = active_rows(coef_div.reshape(n), coef_ce.reshape(n), valid.reshape(n) if with_ce else None,
                       compact_rows)  # None: every row
    grad_on = torch.is_grad_enabled()
    loss, *_ = fused_linear_distill(
        take_rows(rows, student_hidden.reshape(n, hidden_size)), student_weight, student_bias,
        take_rows(rows, teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1])) if with_div else None,
        teacher_weight.detach() if with_div else None,
        teacher_bias.detach() if teacher_bias is not None else None,
        take_rows(rows, labels.reshape(n).long()) if with_ce else None,
        take_rows(rows, coef_div.reshape(n)), take_rows(rows, coef_ce.reshape(n)),
        divergences.IDS[divergence] if with_div else NO_DIVERGENCE, *divergences.kernel_params(divergence, options),
        float(temperature), int(ignore_index), bool(with_ce), backend,
        int(chunk_size),
        reduction != "none", bool(grad_weight_fp32),
        grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad, *transforms)
    return loss if reduction != "none" else put_rows(rows, loss, n).reshape(lead)

