"""Vocabulary-parallel distillation loss: logits sharded along the vocabulary across a process group.

    # rank r holds the logits of ids [vocab_start, vocab_start + V_r) (e.g. a column-parallel LM head)
    loss = distillkit.parallel.distill_loss_vocab_parallel(
        student_shard, teacher_shard, labels, process_group=tp_group, vocab_start=start,
        divergence="forward_kl", temperature=2.0, kl_weight=0.5, ce_weight=0.5)
    loss.backward()   # student_shard.grad: this rank's slice of the full-vocabulary gradient

No rank ever holds the full vocabulary. Everything that is not a logit is REPLICATED: the rows
(leading shape), labels (global ids), per-token weights and the normalizer are the same on every
rank of the group, and so is the returned loss.

How (docs/DISTRIBUTED.md has the derivation):

1. Each rank runs the core forward op (``torch.ops.distillkit.distill_rows``) on its shard: the
   shard's log-normalizers lse_t_r, lse_s_r (at T) and lse1_r (at 1), and for the KLs the shard's
   own divergence div_r; it gathers the target logit when the label falls in its shard.
2. One MAX all-reduce of the per-row lse's, one SUM all-reduce of exp(lse_r - max), the KL
   accumulator exp(lse_r - max) * (div_r + lse_r - lse'_r), the target logit and an in-shard flag:
   this gives the global LSE's, D (forward/reverse KL), ce and which labels are valid.
3. jsd / skew / tvd need p and q normalized globally: a second pass over the shard
   (kernels/vocab_parallel.py, or torch) gives sum d and sum h per row, then one more SUM all-reduce.
4. Backward needs no communication: the loss is a function of the (replicated) per-row D and ce,
   so every rank receives the same grad_div / grad_ce and writes the gradient of its own shard from
   the GLOBAL stats saved by the forward: the core layout (backends/_rows.py) with each global
   log-normalizer as (max 0, log-sum LSE), the same precision as one LSE float.

Per token this all-reduces 4 * (#lse + #sums) bytes: 36 bytes for a KL + CE, 40 for a mixture
divergence + CE (``bytes_all_reduced_per_token``). No host-device synchronization, except the
optional label check (``check_labels=False`` skips it) and the default ``vocab_start`` (pass it).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.distributed as dist

from ..core import _checks
from ..core import backends
from ..core import ops  # noqa: F401  (registers torch.ops.distillkit.*)
from ..core._checks import DIVERGENCE_IDS, NO_DIVERGENCE, Weight
from ..core._reduce import mask_ignored_tokens, weigh_and_reduce
from ..core.backends._rows import (NUM_STATS, STAT_LS_1, STAT_LS_A, STAT_LS_B, STAT_M_1, STAT_M_S, STAT_M_T, as_rows,
                             flush_subnormals)
from ..core.backends.torch_rows import _chunks, _log_probs, divergence_grad, divergence_terms, softmax_at_1
from ..core.functional import LossTerms, _is_literal_zero

__all__ = ["distill_loss_vocab_parallel", "vocab_parallel_loss_terms", "vocab_shard_range", "replicated_input",
           "bytes_all_reduced_per_token"]

_FORWARD_KL = DIVERGENCE_IDS["forward_kl"]
_REVERSE_KL = DIVERGENCE_IDS["reverse_kl"]
_NEG_INF = float("-inf")

# The shard kernels stream a row in blocks like the core kernels (backends/triton_rows.py).
SHARD_TERMS_CONFIG = {"BLOCK_V": 4096, "num_warps": 8}
SHARD_BACKWARD_CONFIG = {"BLOCK_V": 4096, "num_warps": 8}


# -- layout and groups ----------------------------------------------------------------------------

def vocab_shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's shard in the torch.chunk / DTensor ``Shard(-1)`` layout: ceil(V/P) ids per
    rank, the last ranks smaller (possibly empty). Any other layout works too: pass its vocab_start."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    chunk = -(-vocab_size // world_size)
    start = min(rank * chunk, vocab_size)
    return start, min(start + chunk, vocab_size)


def _group(process_group):
    """(group, rank, world size); a world of 1 when torch.distributed is not initialized and no group is given."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        process_group = dist.group.WORLD
    return process_group, dist.get_rank(process_group), dist.get_world_size(process_group)


# group -> {(rank, shard size): vocab_start}. Weak keys: the cache must not keep a destroyed group (and
# its gloo/NCCL threads) alive until interpreter exit, where a gloo worker freeing a finished collective
# needs the GIL while Python is finalizing and aborts the process.
_VOCAB_STARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _default_vocab_start(group, rank: int, world: int, shard_size: int) -> int:
    """Prefix sum of the shard sizes, all-gathered once per (group, shard size) and cached.

    The gather is a host-level collective (a device sync with NCCL). The cache assumes the group's
    layout never changes; a rank whose size changed while another's did not would desynchronize the
    collectives, so pass vocab_start explicitly whenever the layout is not fixed."""
    if world == 1:
        return 0
    if torch.compiler.is_compiling():
        raise ValueError("vocab_start is needed under torch.compile: the default all-gathers the shard sizes "
                         "(a host-level collective); pass vocab_start (e.g. from vocab_shard_range)")
    starts = _VOCAB_STARTS.setdefault(group, {})
    key = (rank, shard_size)
    if key not in starts:
        sizes: list = [None] * world
        dist.all_gather_object(sizes, shard_size, group=group)
        starts[key] = sum(sizes[:rank])
    return starts[key]


def _all_reduce(x: torch.Tensor, op, group, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def bytes_all_reduced_per_token(divergence: Optional[str], with_ce: bool) -> int:
    """fp32 bytes the forward all-reduces per row (the backward all-reduces nothing); divergence None
    means no divergence term (CE only)."""
    n_max = (2 if divergence else 0) + (1 if with_ce else 0)
    n_sum = (2 if divergence else 0) + (3 if with_ce else 0)
    if divergence in ("forward_kl", "reverse_kl"):
        n_sum += 1
    elif divergence:
        n_sum += 2  # second pass: sum d, sum h
    return 4 * (n_max + n_sum)


# -- shard kernels (triton or torch) --------------------------------------------------------------

def _shard_impl(backend: str) -> str:
    """The implementation of the two shard passes: Triton next to the triton/cuda backends, else torch."""
    return "triton" if backend in ("triton", "cuda") else "torch"


def _shard_terms(impl, student, teacher, stats, div_id, mix, temperature, div_vocab):
    """Per row (sum d, sum h) over the shard's first div_vocab ids with the global normalizers in stats."""
    lead = student.shape[:-1]
    n_rows = stats[..., 0].numel()
    d = torch.zeros(lead, dtype=torch.float32, device=student.device)
    h = torch.zeros(lead, dtype=torch.float32, device=student.device)
    if n_rows == 0 or div_vocab == 0:
        return d, h
    if impl == "triton":
        from ..kernels import vocab_parallel as K

        s, t = as_rows(student), as_rows(teacher)
        K.shard_terms_kernel[(n_rows,)](
            s.tensor, t.tensor, stats.contiguous(), d, h, *s.addressing, *t.addressing,
            div_vocab, float(mix), 1.0 / temperature, DIVERGENCE=div_id,
            BLOCK_V=SHARD_TERMS_CONFIG["BLOCK_V"], num_warps=SHARD_TERMS_CONFIG["num_warps"])
        return d, h
    s2 = student.reshape(-1, student.shape[-1])[:, :div_vocab]
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :div_vocab]
    st, d2, h2 = stats.reshape(-1, NUM_STATS), d.view(-1), h.view(-1)
    for rows in _chunks(n_rows, div_vocab):
        _, log_p = _log_probs(t2[rows].float(), st[rows, STAT_M_T], st[rows, STAT_LS_A], 1.0 / temperature)
        _, log_q = _log_probs(s2[rows].float(), st[rows, STAT_M_S], st[rows, STAT_LS_B], 1.0 / temperature)
        dd, hh = divergence_terms(log_p, log_q, log_p.exp(), log_q.exp(), mix, div_id)
        d2[rows], h2[rows] = dd.sum(-1), hh.sum(-1)
    return d, h


def _shard_backward(impl, grad_div, grad_ce, student, teacher, local_labels, stats, div_id, mix, temperature,
                    with_ce, div_vocab):
    """grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y_local)) on the shard, global stats;
    grad_ce is already 0 where the (global) label is not valid, local labels outside [0, V_r) have no one-hot."""
    vocab = student.shape[-1]
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    n_rows = grad_div.numel()
    if n_rows == 0 or vocab == 0:
        return grad
    gd = grad_div.reshape(-1).float().contiguous()
    gc = grad_ce.reshape(-1).float().contiguous()
    if impl == "triton":
        from ..kernels import vocab_parallel as K

        s = as_rows(student)
        t = as_rows(teacher) if div_id != NO_DIVERGENCE else s
        block = SHARD_BACKWARD_CONFIG["BLOCK_V"]
        labels = local_labels.reshape(-1) if with_ce else torch.empty(0, dtype=torch.int64, device=student.device)
        K.shard_backward_kernel[(n_rows, -(-vocab // block))](
            gd, gc, s.tensor, t.tensor, labels, stats.contiguous(), grad, *s.addressing, *t.addressing,
            vocab, div_vocab, float(mix), 1.0 / temperature, DIVERGENCE=div_id, WITH_CE=with_ce, BLOCK_V=block,
            num_warps=SHARD_BACKWARD_CONFIG["num_warps"])
        return grad
    g2, s2 = grad.view(-1, vocab), student.reshape(-1, vocab)
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :div_vocab] if div_id != NO_DIVERGENCE else None
    st = stats.reshape(-1, NUM_STATS)
    y2 = local_labels.reshape(-1) if with_ce else None
    inv_t = 1.0 / temperature
    for rows in _chunks(n_rows, vocab):
        s = s2[rows].float()
        out = torch.zeros_like(s)
        if div_id != NO_DIVERGENCE and div_vocab > 0:
            d_db = divergence_grad(s[:, :div_vocab], t2[rows].float(), st[rows], mix, div_id, inv_t)
            out[:, :div_vocab] += torch.where(gd[rows, None] != 0, (gd[rows, None] / temperature) * d_db, 0.0)
        if with_ce:
            y = y2[rows]
            here = (y >= 0) & (y < vocab)
            onehot = torch.zeros_like(s)
            onehot.scatter_(-1, torch.where(here, y, 0)[:, None], here.float()[:, None])
            g_ce = gc[rows, None]
            out += torch.where(g_ce != 0, g_ce * (softmax_at_1(s, st[rows]) - onehot), 0.0)
        g2[rows] = flush_subnormals(out).to(grad.dtype)
    return grad


# -- the custom ops -------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, so fullgraph=True holds) that take the process group by name, as
# torch's functional collectives do: a ProcessGroup is not a custom-op argument type.

def _group_name(group, world: int) -> str:
    """The name the custom ops take; "" for a world of one (no collectives)."""
    return "" if group is None or world == 1 else group.group_name


def _resolve_group(group_name: str, world: int):
    if not group_name or world == 1:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


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
    world: int, vocab_start: int, div_id: int, mix: float, temperature: float, ignore_index: int,
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
            local_div_id if run_div else NO_DIVERGENCE, float(mix), float(temperature), int(ignore_index),
            run_ce, div_vocab if run_div else vocab, backend)
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
    impl = _shard_impl(backend)
    if with_div and div_id not in (_FORWARD_KL, _REVERSE_KL):
        # 3. Mixture divergences: sum d, sum h over the shard with the global normalizers.
        d, h = _shard_terms(impl, student, teacher, stats, div_id, mix, temperature, div_vocab)
        dh = _all_reduce(torch.stack([d, h], -1), dist.ReduceOp.SUM, group, world)
        div = dh[..., 0]
        stats = _global_stats(lse_a, lse_b, dh[..., 1], lse1)

    return div.contiguous(), ce.contiguous(), valid, stats


@vocab_parallel_rows.register_fake
def _(student, teacher, labels, group_name, world, vocab_start, div_id, mix, temperature, ignore_index, with_ce,
      div_vocab, backend):
    lead, f32 = student.shape[:-1], dict(dtype=torch.float32)
    return (student.new_empty(lead, **f32), student.new_empty(lead, **f32),
            student.new_empty(lead, dtype=torch.bool), student.new_empty((*lead, NUM_STATS), **f32))


@torch.library.custom_op("distillkit::vocab_parallel_rows_backward", mutates_args=())
def vocab_parallel_rows_backward(
    grad_div: torch.Tensor, grad_ce: torch.Tensor, student: torch.Tensor, teacher: Optional[torch.Tensor],
    labels: Optional[torch.Tensor], stats: torch.Tensor, valid: torch.Tensor, vocab_start: int, div_id: int,
    mix: float, temperature: float, ignore_index: int, with_ce: bool, div_vocab: int, backend: str,
) -> torch.Tensor:
    """This shard's slice of the student gradient; no communication (the forward made stats global)."""
    if student.shape[-1] == 0:
        return torch.empty_like(student)
    if not with_ce and div_vocab > 0:
        # Divergence only: the core backward is shard-local once it has the global stats.
        return torch.ops.distillkit.distill_rows_backward(
            grad_div, torch.zeros_like(grad_div), student, teacher, None, stats, div_id, float(mix),
            float(temperature), int(ignore_index), False, div_vocab, backend)
    # The core backward drops the CE gradient of a row whose label is out of range, i.e. in another shard,
    # where this shard still needs grad_ce * softmax(s): the shard backward takes the validity of the global
    # label through grad_ce and uses the local label for the one-hot only.
    local = _local_labels(labels, ignore_index, vocab_start, student.shape[-1])[0] if with_ce else None
    grad_ce = torch.where(valid, grad_ce.float(), 0.0)
    return _shard_backward(_shard_impl(backend), grad_div, grad_ce, student, teacher, local, stats, div_id, mix,
                           temperature, with_ce, div_vocab)


@vocab_parallel_rows_backward.register_fake
def _(grad_div, grad_ce, student, teacher, labels, stats, valid, vocab_start, div_id, mix, temperature,
      ignore_index, with_ce, div_vocab, backend):
    return torch.empty_like(student)


_ROWS_ARGS = ("student", "teacher", "labels", "group_name", "world", "vocab_start", "div_id", "mix", "temperature",
              "ignore_index", "with_ce", "div_vocab", "backend")


def _rows_setup_context(ctx, inputs, output):
    student, teacher, labels, _group_name_, _world, vocab_start, *options = inputs
    _, _, valid, stats = output
    ctx.save_for_backward(student, teacher, labels, stats, valid)
    ctx.vocab_start, ctx.options = vocab_start, tuple(options)  # div_id, mix, T, ignore_index, with_ce, div_vocab, backend
    ctx.mark_non_differentiable(valid, stats)


def _rows_backward(ctx, grad_div, grad_ce, _grad_valid, _grad_stats):
    if not ctx.needs_input_grad[0]:
        return tuple(None for _ in _ROWS_ARGS)
    student, teacher, labels, stats, valid = ctx.saved_tensors
    zeros = torch.zeros_like(stats[..., 0])
    grad = vocab_parallel_rows_backward(zeros if grad_div is None else grad_div,
                                        zeros if grad_ce is None else grad_ce, student, teacher, labels, stats,
                                        valid, ctx.vocab_start, *ctx.options)
    return (grad,) + tuple(None for _ in _ROWS_ARGS[1:])


vocab_parallel_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)


def _rows(student, teacher, labels, group, world, vocab_start, div_id, mix, temperature, ignore_index, with_ce,
          div_vocab, backend):
    div, ce, valid, _ = vocab_parallel_rows(student, teacher, labels, _group_name(group, world),
                                            world, vocab_start, div_id, mix, temperature, ignore_index, with_ce,
                                            div_vocab, backend)
    return div, ce, valid


# -- public API -----------------------------------------------------------------------------------

def vocab_parallel_loss_terms(
    student_shard: torch.Tensor,
    teacher_shard: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    check_labels: bool = True,
    with_divergence: bool = True,
    with_ce: Optional[bool] = None,
    vocab_mismatch: str = "error",
) -> LossTerms:
    """Per-token (global) divergence, cross-entropy and valid-label mask from vocabulary shards; the
    vocabulary-parallel counterpart of :func:`distillkit.loss_terms` (same arguments, plus
    process_group / vocab_start as in :func:`distill_loss_vocab_parallel`). Replicated on every rank."""
    _checks.check_options(divergence=divergence, beta=beta, skew=skew, temperature=temperature,
                          reduction="none", backend=backend)
    _checks.check_pair(student_shard, teacher_shard if with_divergence else None, vocab_mismatch)
    _checks.check_labels(labels, student_shard)
    if with_divergence and teacher_shard is None:
        raise ValueError("teacher_shard is None: pass teacher logits, or kl_weight=0.0 for a CE-only loss")
    with_ce = labels is not None if with_ce is None else with_ce
    if with_ce and labels is None:
        raise ValueError("ce_weight is non-zero but labels is None: pass labels for the CE term")
    group, rank, world = _group(process_group)
    shard_size = student_shard.shape[-1]
    if vocab_start is None:
        vocab_start = _default_vocab_start(group, rank, world, shard_size)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise TypeError(f"vocab_start must be a Python int >= 0 (the global id of this shard's first column); "
                        f"got {vocab_start!r}")

    resolved = backends.resolve(backend, student_shard.device)
    div_id = DIVERGENCE_IDS[divergence] if with_divergence else NO_DIVERGENCE
    mix = beta if divergence == "jsd" else skew
    div_vocab = min(shard_size, teacher_shard.shape[-1]) if with_divergence else shard_size
    div, ce, valid = _rows(student_shard, teacher_shard.detach() if with_divergence else None,
                           labels if with_ce else None, group, world, vocab_start, div_id, float(mix),
                           float(temperature), int(ignore_index), bool(with_ce), div_vocab, resolved)
    if labels is None:
        return LossTerms(div, ce, None)
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
    return LossTerms(div, ce, valid)


def distill_loss_vocab_parallel(
    student_shard: torch.Tensor,
    teacher_shard: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    process_group=None,
    vocab_start: Optional[int] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    temperature_scaling: bool = True,
    kl_weight: Weight = 1.0,
    ce_weight: Weight = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
    check_labels: bool = True,
    vocab_mismatch: str = "error",
    divergence_on_ignored: bool = False,
) -> torch.Tensor:
    """:func:`distillkit.distill_loss` over logits sharded along the vocabulary across ``process_group``.

    Args:
        student_shard: [..., V_r] this rank's slice of the student logits (shards may differ in size and
            may be empty); receives the gradient of its slice.
        teacher_shard: [..., V_r] the same slice of the teacher logits (constant). Under
            vocab_mismatch="truncate" it may be narrower: the divergence covers, on each rank, the first
            min(V_r, V_teacher_r) ids of the shard (with padding on the last rank, as usual, that is the
            global truncation to the shared first ids); CE keeps every student id.
        labels: [...] GLOBAL label ids, identical on every rank (as are the weights and normalizer).
        process_group: the ranks that share the rows (a tensor-parallel group); default the world group.
            Without torch.distributed initialized and no group, it is the single-process loss.
        vocab_start: global id of this shard's first column. Pass it (e.g. from
            :func:`vocab_shard_range`): without it the shard sizes are all-gathered on the first call
            (a host-level collective) and cached per (group, shard size), which assumes a fixed layout.
        The other arguments are those of :func:`distillkit.distill_loss`.
    Returns:
        The loss (float32), identical on every rank. Backward on every rank (it needs no communication)
        writes each rank's slice of the gradient; a replicated input of the logits (the hidden state of a
        column-parallel LM head) must sum its gradient over the group: see :func:`replicated_input`.
    """
    _checks.check_options(divergence=divergence, beta=beta, skew=skew, temperature=temperature,
                          reduction=reduction, backend=backend)
    _checks.check_logits("student_logits", student_shard)
    lead_shape = student_shard.shape[:-1]
    _checks.check_weight("kl_weight", kl_weight, lead_shape, student_shard.device)
    _checks.check_weight("ce_weight", ce_weight, lead_shape, student_shard.device)
    _checks.check_normalizer(normalizer)
    if labels is None and not _is_literal_zero(ce_weight):
        raise ValueError("ce_weight is non-zero but labels is None: pass labels for the CE term")
    terms = vocab_parallel_loss_terms(
        student_shard, teacher_shard, labels, process_group=process_group, vocab_start=vocab_start,
        divergence=divergence, beta=beta, skew=skew, temperature=temperature, ignore_index=ignore_index,
        backend=backend, check_labels=check_labels, vocab_mismatch=vocab_mismatch,
        with_divergence=not _is_literal_zero(kl_weight),
        with_ce=labels is not None and not _is_literal_zero(ce_weight))
    kl_weight = mask_ignored_tokens(kl_weight, terms.valid_label, divergence_on_ignored)
    return weigh_and_reduce(*terms, kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature,
                            temperature_scaling=temperature_scaling, reduction=reduction, normalizer=normalizer)


# -- composition with a column-parallel LM head ---------------------------------------------------

@torch.library.custom_op("distillkit::replicated_input", mutates_args=())
def _replicated_input_op(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """Identity (a copy: a custom op's output may not alias its input); the gradient is all-reduced."""
    return x.clone()


@_replicated_input_op.register_fake
def _(x, group_name, world):
    return torch.empty_like(x)


@torch.library.custom_op("distillkit::group_sum", mutates_args=())
def _group_sum(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """Sum of x over the group (a fresh tensor)."""
    return _all_reduce(x.contiguous().clone(), dist.ReduceOp.SUM, _resolve_group(group_name, world), world)


@_group_sum.register_fake
def _(x, group_name, world):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _replicated_setup_context(ctx, inputs, output):
    _, ctx.group_name, ctx.world = inputs


def _replicated_backward(ctx, grad):
    return _group_sum(grad, ctx.group_name, ctx.world), None, None


_replicated_input_op.register_autograd(_replicated_backward, setup_context=_replicated_setup_context)


def replicated_input(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient in backward, so that a tensor replicated across
    the group (the hidden state entering a column-parallel LM head) gets the gradient of every shard's
    logits (Megatron's "copy to tensor-parallel region"). DTensor's ColwiseParallel does this itself."""
    group, _, world = _group(process_group)
    return _replicated_input_op(x, _group_name(group, world), world)
