"""The vocabulary-parallel custom ops: per-row global (D, ce, valid label, stats) from vocabulary shards,
and the shard's gradient. Opaque to torch.compile (fullgraph=True holds); the process group travels by name."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..core import backends, divergences
from ..core.ops import input_gradients  # also registers torch.ops.distillkit.distill_rows*
from ..core.backends._rows import NUM_STATS, STAT_LS_1, STAT_LS_A, STAT_LS_B, STAT_M_1, STAT_M_S, STAT_M_T
from ..core.divergences import NO_DIVERGENCE
from .groups import _all_reduce, _default_vocab_start, _group, _group_name, _resolve_group
from .shards import _shard_backward, _shard_terms

_FORWARD_KL = divergences.IDS["forward_kl"]
_REVERSE_KL = divergences.IDS["reverse_kl"]
_NEG_INF = float("-inf")


def _local_labels(labels, ignore_index: int, vocab_start: int, vocab: int):
    """(label index inside this shard or -1, label is in this shard): out-of-shard and ignored labels
    become -1, outside [0, V_r), so the shard's one-hot is empty."""
    labels = labels.long()
    in_shard = (labels != ignore_index) & (labels >= vocab_start) & (labels < vocab_start + vocab)
    return torch.where(in_shard, labels - vocab_start, -1), in_shard


def _lse(stats: torch.Tensor, m_slot: int, ls_slot: int, inv_t: float) -> torch.Tensor:
    """A shard's log-normalizer m / T + ls from the core op's stats; -inf for a row with nothing on the shard."""
    m = stats[..., m_slot]
    return torch.where(m == _NEG_INF, _NEG_INF, m * inv_t + stats[..., ls_slot])


def _global_stats(lse_a, lse_b, c, lse1) -> torch.Tensor:
    """The core stats layout with every maximum 0 and every log-sum the global LSE."""
    zero = torch.zeros_like(c)
    return torch.stack([zero, lse_a, zero, lse_b, c, zero, lse1, zero], -1).contiguous()


@torch.library.custom_op("distillkit::vocab_parallel_rows", mutates_args=())
def vocab_parallel_rows(
    student: torch.Tensor, teacher: Optional[torch.Tensor], labels: Optional[torch.Tensor], group_name: str,
    world: int, vocab_start: int, div_id: int, param_a: float, param_b: float, temperature: float, ignore_index: int,
    with_ce: bool, div_vocab: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student shard, teacher shard, global labels) -> global per-row (D, ce, valid label, stats), replicated
    on every rank of the group; stats [..., NUM_STATS] are the global statistics the backward needs."""
    group = _resolve_group(group_name, world)
    lead, vocab, dev = student.shape[:-1], student.shape[-1], student.device
    with_div = div_id != NO_DIVERGENCE
    zeros = torch.zeros(lead, dtype=torch.float32, device=dev)

    local = None
    if with_ce:
        local, in_shard = _local_labels(labels, ignore_index, vocab_start, vocab)
        if vocab > 0:
            target = student.gather(-1, local.clamp_min(0).unsqueeze(-1)).squeeze(-1).float()
            target = torch.where(in_shard, target, 0.0)
        else:
            target = zeros

    # 1. Shard statistics from the core op. The mixture divergences only need the shard's normalizers
    #    here, which the forward-KL variant computes in one online pass (their D comes in step 3).
    #    An empty shard (or an empty shared part under "truncate") contributes lse = -inf.
    run_div, run_ce = with_div and div_vocab > 0, with_ce and vocab > 0
    local_div_id = div_id if div_id in (NO_DIVERGENCE, _FORWARD_KL, _REVERSE_KL) else _FORWARD_KL
    lse_r = torch.full((*lead, 3), _NEG_INF, dtype=torch.float32, device=dev)  # lse(t/T), lse(s/T), lse(s)
    div_r = zeros
    if run_div or run_ce:
        div_r, _, stats_op = torch.ops.distillkit.distill_rows(
            student, teacher if run_div else None, local if run_ce else None,
            local_div_id if run_div else NO_DIVERGENCE, float(param_a), float(param_b), float(temperature),
            int(ignore_index), run_ce, div_vocab if run_div else vocab, backend)
        if run_div:
            lse_r[..., 0] = _lse(stats_op, STAT_M_T, STAT_LS_A, 1.0 / temperature)
            lse_r[..., 1] = _lse(stats_op, STAT_M_S, STAT_LS_B, 1.0 / temperature)
        if run_ce:
            lse_r[..., 2] = _lse(stats_op, STAT_M_1, STAT_LS_1, 1.0)

    # 2. MAX then SUM all-reduce of the per-row partials.
    lse_cols = ([lse_r[..., 0], lse_r[..., 1]] if with_div else []) + ([lse_r[..., 2]] if with_ce else [])
    lse_a = lse_b = lse1 = c = zeros
    div, ce = zeros.clone(), zeros.clone()  # two distinct outputs even when both are 0
    valid = torch.zeros(lead, dtype=torch.bool, device=dev)
    if lse_cols:
        lse_local = torch.stack(lse_cols, -1)
        lse_max = _all_reduce(lse_local.clone(), dist.ReduceOp.MAX, group, world)
        lse_ref = torch.where(lse_max == _NEG_INF, 0.0, lse_max)  # exp(-inf - -inf) would be NaN
        weight = torch.exp(lse_local - lse_ref)  # exp(lse_r - max): this shard's share of exp(LSE)
        sum_cols = [weight]
        if div_id in (_FORWARD_KL, _REVERSE_KL):
            # Shard KL with its own normalizers: div_r = sum_r p_r (x - y) - lse_x_r + lse_y_r (x = a, y = b
            # for forward, swapped for reverse), so sum_r p_r (x - y) = div_r + lse_x_r - lse_y_r.
            i_x, i_y = (0, 1) if div_id == _FORWARD_KL else (1, 0)
            lse_x, lse_y = lse_local[..., i_x], lse_local[..., i_y]
            # A shard whose y side is all -inf while x has mass: the core kernel's div_r is NaN (inf - inf);
            # the true term is +inf.
            inner = torch.where(lse_y == _NEG_INF, float("inf"), div_r + lse_x - lse_y)
            w_x = weight[..., i_x]
            sum_cols.append(torch.where(w_x > 0, w_x * inner, 0.0).unsqueeze(-1))
        if with_ce:
            sum_cols.append(torch.stack([target, in_shard.float()], -1))
        sums = _all_reduce(torch.cat(sum_cols, -1), dist.ReduceOp.SUM, group, world)
        lse_global = lse_ref + torch.log(sums[..., :len(lse_cols)])
        k = len(lse_cols)
        if with_div:
            lse_a, lse_b = lse_global[..., 0], lse_global[..., 1]
            if div_id in (_FORWARD_KL, _REVERSE_KL):
                z_x = sums[..., i_x]
                div = sums[..., k] / z_x - lse_global[..., i_x] + lse_global[..., i_y]
                # reverse: c = E_q[b - a] = D + lse_b - lse_a (the backward's q (b - a - c), maxima 0 here)
                c = torch.full_like(div, -1.0) if div_id == _FORWARD_KL else div + (lse_b - lse_a)
                k += 1
        if with_ce:
            lse1 = lse_global[..., -1]
            valid = sums[..., k + 1] > 0.5
            ce = torch.where(valid, lse1 - sums[..., k], 0.0)

    stats = _global_stats(lse_a, lse_b, c, lse1)
    impl = backends.shard_implementation(backend)
    if with_div and div_id not in (_FORWARD_KL, _REVERSE_KL):
        # 3. Mixture divergences: sum d, sum h over the shard with the global normalizers.
        d, h = _shard_terms(impl, student, teacher, stats, div_id, param_a, param_b, temperature, div_vocab)
        dh = _all_reduce(torch.stack([d, h], -1), dist.ReduceOp.SUM, group, world)
        div = dh[..., 0]
        stats = _global_stats(lse_a, lse_b, dh[..., 1], lse1)

    return div.contiguous(), ce.contiguous(), valid, stats


@vocab_parallel_rows.register_fake
def _(student, teacher, labels, group_name, world, vocab_start, div_id, param_a, param_b, temperature, ignore_index,
      with_ce,
      div_vocab, backend):
    lead, f32 = student.shape[:-1], dict(dtype=torch.float32)
    return (student.new_empty(lead, **f32), student.new_empty(lead, **f32),
            student.new_empty(lead, dtype=torch.bool), student.new_empty((*lead, NUM_STATS), **f32))


@torch.library.custom_op("distillkit::vocab_parallel_rows_backward", mutates_args=())
def vocab_parallel_rows_backward(
    grad_div: torch.Tensor, grad_ce: torch.Tensor, student: torch.Tensor, teacher: Optional[torch.Tensor],
    labels: Optional[torch.Tensor], stats: torch.Tensor, valid: torch.Tensor, vocab_start: int, div_id: int,
    param_a: float, param_b: float, temperature: float, ignore_index: int, with_ce: bool, div_vocab: int, backend: str,
) -> torch.Tensor:
    """This shard's slice of the student gradient; no communication (the forward made stats global)."""
    if student.shape[-1] == 0:
        return torch.empty_like(student)
    if not with_ce and div_vocab > 0:
        # Divergence only: the core backward is shard-local once it has the global stats.
        return torch.ops.distillkit.distill_rows_backward(
            grad_div, torch.zeros_like(grad_div), student, teacher, None, stats, div_id, float(param_a), float(param_b),
            float(temperature), int(ignore_index), False, div_vocab, backend)
    # The core backward drops the CE gradient of a row whose label is out of range, i.e. in another shard,
    # where this shard still needs grad_ce * softmax(s): the shard backward takes the validity of the global
    # label through grad_ce and uses the local label for the one-hot only.
    local = _local_labels(labels, ignore_index, vocab_start, student.shape[-1])[0] if with_ce else None
    grad_ce = torch.where(valid, grad_ce.float(), 0.0)
    return _shard_backward(backends.shard_implementation(backend), grad_div, grad_ce, student, teacher, local, stats,
                           div_id, param_a, param_b,
                           temperature, with_ce, div_vocab)


@vocab_parallel_rows_backward.register_fake
def _(grad_div, grad_ce, student, teacher, labels, stats, valid, vocab_start, div_id, param_a, param_b, temperature,
      ignore_index, with_ce, div_vocab, backend):
    return torch.empty_like(student)


def _rows_setup_context(ctx, inputs, output):
    student, teacher, labels, _group_name_, _world, vocab_start, *options = inputs
    _, _, valid, stats = output
    ctx.save_for_backward(student, teacher, labels, stats, valid)
    # options: div_id, param_a, param_b, temperature, ignore_index, with_ce, div_vocab, backend
    ctx.vocab_start, ctx.options = vocab_start, tuple(options)
    ctx.mark_non_differentiable(valid, stats)


def _rows_backward(ctx, grad_div, grad_ce, _grad_valid, _grad_stats):
    if not ctx.needs_input_grad[0]:
        return input_gradients(vocab_parallel_rows)
    student, teacher, labels, stats, valid = ctx.saved_tensors
    zeros = torch.zeros_like(stats[..., 0])
    grad = vocab_parallel_rows_backward(zeros if grad_div is None else grad_div,
                                        zeros if grad_ce is None else grad_ce, student, teacher, labels, stats,
                                        valid, ctx.vocab_start, *ctx.options)
    return input_gradients(vocab_parallel_rows, student=grad)


vocab_parallel_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)


def sharded_loss_terms(student, teacher, labels, *, process_group, vocab_start: Optional[int], div_id: int,
                       params: tuple[float, float], temperature: float, ignore_index: int, with_ce: bool,
                       check_labels: bool, div_vocab: int, backend: str):
    """Global per-token (D, ce, valid label) from this rank's vocabulary shard, replicated on every rank
    (the caller has checked the arguments); params are the divergence's (param_a, param_b)."""
    group, rank, world = _group(process_group)
    if vocab_start is None:
        vocab_start = _default_vocab_start(group, rank, world, student.shape[-1])
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise TypeError(f"vocab_start must be a Python int >= 0 (the global id of this shard's first column); "
                        f"got {vocab_start!r}")
    div, ce, valid, _ = vocab_parallel_rows(student, teacher, labels if with_ce else None, _group_name(group, world),
                                            world, vocab_start, div_id, *params, temperature, ignore_index,
                                            with_ce, div_vocab, backend)
    if labels is None:
        return div, ce, None
    if not with_ce:
        # No CE pass ran, so validity is unknown: it only matters for the "mean" count, where CE is off anyway.
        valid = labels != ignore_index
    elif check_labels and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ~valid
        if bool(bad.any()):
            first = labels[bad].flatten()[0]
            raise ValueError(
                f"labels contains {int(first)}, which is neither ignore_index={ignore_index} nor in any rank's "
                "vocabulary shard; pass check_labels=False to skip this check (such labels then count as ignored)")
    return div, ce, valid
