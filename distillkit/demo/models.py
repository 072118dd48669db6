"""Tokenizer, tiny Llama models and the training loops of the demo.

Every model is trained by the same small loop with :class:`distillkit.SpanDistillationLoss`
(the product's loss): the teacher and the SFT student with cross-entropy only, the
distilled students with KL to the teacher's logits on reasoning, KL + CE on actions and
answers, and nothing on prompts and observations. The offline student has the same span
weights against the teacher's top-k log-probabilities read back from a teacher cache
(:class:`TopKSpanLoss`, :func:`distillkit.sparse.distill_loss_topk`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..agents.agent import ReActFormat, encode_trajectory
from ..core.modules import SpanDistillationLoss, span_token_weights
from ..core.spans import PAD_SPAN
from ..sparse.topk import distill_loss_topk

SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>"]
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts: Sequence[str], vocab_size: int = 256):
    """A small BPE trained locally: digits stay single characters, a space attaches to the next word."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\n|^[A-Z]:|\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+| "), behavior="isolated")
    tok.decoder = decoders.Fuse()
    alphabet = sorted(set("".join(texts)))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@dataclasses.dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    ffn: int


def make_model(vocab_size: int, size: ModelSize, seed: int = 0):
    """A tiny Llama built from a config (no download), tied embeddings, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.heads, intermediate_size=size.ffn,
        max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=None,
        eos_token_id=EOS_ID, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = PAD_ID
    return model


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass
class Example:
    ids: list[int]
    spans: list[int]
    teacher_logits: Optional[torch.Tensor] = None  # [len(ids) - 1, V], predictions of ids[1:]
    teacher_topk: Optional[tuple] = None  # (ids [len(ids) - 1, K] int64, logprobs [len(ids) - 1, K]) from a cache


def encode_examples(tokenizer, trajectories: Sequence[Mapping], fmt: ReActFormat = ReActFormat()) -> list[Example]:
    return [Example(*encode_trajectory(tokenizer, t, fmt)) for t in trajectories]


TEACHER_SOURCES = ("none", "logits", "topk")


def collate(examples: Sequence[Example], teacher: str = "none"):
    """Batch tensors: input ids, attention mask, next-token labels, span ids (span of the target) and the
    teacher's targets: None, its logits [B, W - 1, V], or its cached top-k (ids, logprobs) [B, W - 1, K]
    (id -1 at padding: no teacher signal there)."""
    if teacher not in TEACHER_SOURCES:
        raise ValueError(f"teacher must be one of {TEACHER_SOURCES}; got {teacher!r}")
    width = max(len(e.ids) for e in examples)
    size = len(examples)
    ids = torch.full((size, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(size, width, dtype=torch.long)
    labels = torch.full((size, width - 1), -100, dtype=torch.long)
    spans = torch.full((size, width - 1), PAD_SPAN, dtype=torch.long)
    if teacher == "logits":
        targets = torch.zeros(size, width - 1, examples[0].teacher_logits.shape[-1])
    elif teacher == "topk":
        k = examples[0].teacher_topk[0].shape[-1]
        targets = (torch.full((size, width - 1, k), -1, dtype=torch.long),
                   torch.full((size, width - 1, k), -math.inf))
    else:
        targets = None
    for row, ex in enumerate(examples):
        n = len(ex.ids)
        ids[row, :n] = torch.tensor(ex.ids)
        mask[row, :n] = 1
        labels[row, :n - 1] = torch.tensor(ex.ids[1:])
        spans[row, :n - 1] = torch.tensor(ex.spans[1:])
        if teacher == "logits":
            targets[row, :n - 1] = ex.teacher_logits
        elif teacher == "topk":
            targets[0][row, :n - 1], targets[1][row, :n - 1] = ex.teacher_topk
    return ids, mask, labels, spans, targets


@torch.no_grad()
def attach_teacher_logits(teacher, examples: Sequence[Example], batch_size: int = 64,
                          progress: Optional[Callable] = None) -> None:
    """Run the teacher once over the examples and keep its logits (the students see them every epoch)."""
    teacher.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        ids, *_ = collate(chunk)
        logits = teacher(input_ids=ids).logits.float()  # right padding: no mask needed (see _batch_loss)
        for row, ex in enumerate(chunk):
            ex.teacher_logits = logits[row, :len(ex.ids) - 1].clone()
        if progress is not None:
            progress(len(chunk))


def attach_teacher_topk(cache, examples: Sequence[Example]) -> None:
    """Read every example's top-k rows back from a TeacherCache written over `[ex.ids for ex in examples]`
    (the rows of positions 0 .. n-2, which predict ids[1:])."""
    if len(cache) != len(examples):
        raise ValueError(f"the cache holds {len(cache)} examples, the students train on {len(examples)}")
    for i, ex in enumerate(examples):
        ids, logprobs = cache.example(i)
        ex.teacher_topk = (ids[:len(ex.ids) - 1].long(), logprobs[:len(ex.ids) - 1].float())


class TopKSpanLoss(SpanDistillationLoss):
    """SpanDistillationLoss's span table against a top-k teacher: forward(logits, (ids, logprobs), labels, spans).

    The divergence runs over the cached ids plus one "rest" category holding each side's remaining mass (tail
    "bucket", the trainer's default for a top-k cache; with "renormalize" the student's mass outside the
    cached ids is free, and on reasoning spans, where the divergence is the only term, the demo's student
    put it on wrong tokens: 8.3% success); the span ids alone decide where it applies, as in the dense loss."""

    def __init__(self, span_weights, *, tail: str = "bucket", teacher_temperature: float = 1.0, **options):
        super().__init__(span_weights, **options)
        self.tail, self.teacher_temperature = tail, teacher_temperature

    def forward(self, student_logits, teacher_topk, labels, span_ids, *, normalizer=None):
        per_token = span_token_weights(self.effective_table(), span_ids)
        options = {k: v for k, v in self.term_options.items() if k in ("divergence", "temperature", "ignore_index",
                                                                       "backend", "check_labels")}
        return distill_loss_topk(student_logits, *teacher_topk, labels, tail=self.tail,
                                 teacher_temperature=self.teacher_temperature, kl_weight=per_token[..., 0],
                                 ce_weight=per_token[..., 1], temperature_scaling=self.temperature_scaling,
                                 reduction=self.reduction, normalizer=normalizer, divergence_on_ignored=True,
                                 **options)


SFT_WEIGHTS = {"reason": (0.0, 1.0), "action": (0.0, 1.0), "answer": (0.0, 1.0)}
# KL on reasoning, KL + CE on actions and answers, nothing on prompts and observations; every
# target token carries the same total weight (2). With (1, 0) on reasoning the reasoning tokens
# get a third of the weight of the others and, in this budget, the student did not learn to copy
# item names from the question into its reasoning.
DISTILL_WEIGHTS = {"reason": (2.0, 0.0), "action": (1.0, 1.0), "answer": (1.0, 1.0)}


def active_tokens(loss_fn: SpanDistillationLoss, examples: Sequence[Example]) -> torch.Tensor:
    """The "mean" reduction's denominator for a batch of examples: target tokens whose span has a KL weight,
    or a CE weight (every target here has a valid label)."""
    spans = torch.cat([torch.tensor(ex.spans[1:], dtype=torch.long) for ex in examples])
    per_token = span_token_weights(loss_fn.effective_table(), spans)
    return ((per_token[:, 0] != 0) | (per_token[:, 1] != 0)).sum().to(torch.float32)


def _batch_loss(model, examples, teacher, loss_fn, normalizer=None):
    ids, _, labels, spans, targets = collate(examples, teacher)
    # Right padding: a causal model's real positions never attend to the pads after them, so no padding mask
    # (causal SDPA without one: the same values here, bit for bit, and faster); pad positions carry no loss.
    logits = model(input_ids=ids).logits[:, :-1]
    return loss_fn(logits, targets, labels, spans, normalizer=normalizer)


def _part_gradients(model, part, teacher, loss_fn, normalizer, params):
    loss = _batch_loss(model, part, teacher, loss_fn, normalizer)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def train(model, examples: Sequence[Example], *, steps: int, batch_size: int, lr: float,
          loss_fn: SpanDistillationLoss, teacher: str = "none", seed: int = 0, warmup: int = 20,
          weight_decay: float = 0.01, bucket: int = 1, batch_parts: int = 1, bar=None,
          next_batch: Optional[Callable[[], tuple[list[Example], SpanDistillationLoss]]] = None,
          snapshot: Optional[tuple[int, Callable]] = None, start_step: int = 0,
          optimizer_state: Optional[dict] = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; batches drawn at random (the same draws for a seed).

    teacher: what the loss gets as the teacher (see `collate`): "none" (the span weights then have
    no KL term), "logits" (the examples' teacher logits) or "topk" (their cached top-k, for a TopKSpanLoss).
    bucket > 1 draws that many batches at once and groups them by length (less padding, but batches of one
    difficulty: these tiny models then learn the copying slower, so the demo keeps 1).
    batch_parts > 1 splits each batch into that many parts, run on as many Python threads at once (torch
    releases the GIL in its ops; one torch thread each): each part's loss is normalized by the whole
    batch's token count, so that they add up to the batch's loss, and the parts' gradients are added in a
    fixed order. The result does not depend on the machine's load (unlike torch's intra-op threads, whose
    spinning also stalls on shared cores).
    next_batch: a callable giving each step's batch and its loss instead of the random draws from `examples` and
    `loss_fn` (the on-policy student's phase). snapshot=(k, fn): fn(model, optimizer) after step k (its warm
    start); start_step, optimizer_state: continue such a snapshot (steps `start_step` to `steps` of the same
    schedule, AdamW's moments restored).
    Returns the loss per step.
    """
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    if optimizer_state is not None:
        opt.load_state_dict({"state": optimizer_state, "param_groups": opt.state_dict()["param_groups"]})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: schedule(i + start_step))
    losses = []
    batches: list[list[Example]] = []
    pool = ThreadPoolExecutor(max_workers=batch_parts - 1) if batch_parts > 1 else None
    try:
        for step in range(start_step, steps):
            step_loss = loss_fn
            if next_batch is not None:
                batch, step_loss = next_batch()
                batches = [batch]
            elif not batches:  # draw `bucket` batches at once and group them by length: less padding
                drawn = sorted((examples[rng.randrange(len(examples))] for _ in range(bucket * batch_size)),
                               key=lambda e: len(e.ids))
                batches = [drawn[i:i + batch_size] for i in range(0, len(drawn), batch_size)]
                rng.shuffle(batches)
            batch = batches.pop()
            opt.zero_grad(set_to_none=True)
            if pool is None:
                loss = _batch_loss(model, batch, teacher, step_loss)
                loss.backward()
                loss = loss.detach()
            else:
                normalizer = active_tokens(step_loss, batch).clamp_min(1)
                size = -(-len(batch) // batch_parts)
                parts = [batch[i:i + size] for i in range(0, len(batch), size)]
                pending = [pool.submit(_part_gradients, model, part, teacher, step_loss, normalizer, params)
                           for part in parts[1:]]
                done = [_part_gradients(model, parts[0], teacher, step_loss, normalizer, params)]
                done += [future.result() for future in pending]
                loss = sum(part_loss for part_loss, _ in done)
                for param, *grads in zip(params, *(part_grads for _, part_grads in done)):
                    grads = [g for g in grads if g is not None]
                    param.grad = sum(grads[1:], grads[0]) if grads else None
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if snapshot is not None and step + 1 == snapshot[0]:
                snapshot[1](model, opt)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown()
    model.eval()
    return losses


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One student to train: its size, its loss (span weights) and the optimization settings.

    warm_start=(job name, k): start from that job's model after its step k instead of a fresh one, and
    train on-policy (`on_policy`, a :class:`distillkit.demo.on_policy.OnPolicyPlan`) for `steps` more steps."""

    name: str
    size: ModelSize
    vocab_size: int
    span_weights: tuple  # ((span name, (kl_weight, ce_weight)), ...)
    teacher: str  # "none" (SFT) | "logits" (dense KD) | "topk" (from the teacher cache)
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    warm_start: Optional[tuple] = None
    on_policy: Any = None


def _state_bytes(model, optimizer=None) -> bytes:
    """safetensors bytes of a model's weights (clones: tied weights may share storage) and, with it, the
    optimizer's per-parameter state; nothing is pickled."""
    from safetensors.torch import save as save_safetensors

    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if optimizer is not None:
        for index, state in optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer.{index}.{name}": torch.as_tensor(value).detach().clone().contiguous()
                            for name, value in state.items()})
    return save_safetensors(tensors)


def _load_state(job: TrainJob, state: bytes):
    """(model, optimizer state or None) from _state_bytes."""
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(state)
    model = make_model(job.vocab_size, job.size, seed=job.seed)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer.setdefault(int(index), {})[name] = value
    return model, optimizer or None


def run_job(job: TrainJob, examples: Sequence[Example], bar=None, *, snapshot: Optional[tuple] = None,
            warm_state: Optional[bytes] = None, context=None):
    """Build and train one model; returns (model, losses, seconds). snapshot=(k, fn): fn(model) after step k;
    warm_state: the model to start from (a job with warm_start), context: what its on-policy rollouts need."""
    start = time.perf_counter()
    if job.on_policy is not None:  # context: a distillkit.demo.on_policy.OnPolicyContext
        model, optimizer_state = _load_state(job, warm_state)
        losses = context.train(model, job, examples, optimizer_state, bar=bar)
        return model, losses, time.perf_counter() - start
    model = make_model(job.vocab_size, job.size, seed=job.seed)
    loss_type = TopKSpanLoss if job.teacher == "topk" else SpanDistillationLoss
    loss_fn = loss_type(dict(job.span_weights), divergence=job.divergence, temperature=job.temperature)
    losses = train(model, examples, steps=job.steps, batch_size=job.batch_size, lr=job.lr, loss_fn=loss_fn,
                   teacher=job.teacher, seed=job.seed, bar=bar, snapshot=snapshot)
    return model, losses, time.perf_counter() - start


def _snapshot_steps(jobs: Sequence[TrainJob]) -> dict[str, int]:
    steps = {job.warm_start[0]: job.warm_start[1] for job in jobs if job.warm_start is not None}
    names = {job.name for job in jobs}
    for name in steps:
        if name not in names:
            raise ValueError(f"a job warm-starts from {name!r}, which is not among the jobs")
    return steps


def _job_process(job, examples, queue, position, progress, snapshot_at, warm_state, context):  # pragma: no cover
    import traceback

    torch.set_num_threads(1)
    try:
        from tqdm.auto import tqdm

        snapshot = None
        if snapshot_at is not None:
            snapshot = (snapshot_at, lambda model, opt: queue.put(("snapshot", job.name, _state_bytes(model, opt))))
        with tqdm(total=job.steps - (job.warm_start[1] if job.warm_start else 0), desc=f"train {job.name}",
                  position=position, leave=False,
                  disable=not progress, dynamic_ncols=True) as bar:
            model, losses, seconds = run_job(job, examples, bar, snapshot=snapshot, warm_state=warm_state,
                                             context=context)
        queue.put(("done", job.name, _state_bytes(model), losses, seconds, None))
    except BaseException:
        queue.put(("done", job.name, None, None, None, traceback.format_exc()))


def run_jobs(jobs: Sequence[TrainJob], examples: Sequence[Example], *, workers: int = 1, progress: bool = True,
             bar_factory: Optional[Callable] = None, context=None) -> dict[str, tuple]:
    """Train several models, ``workers`` at a time in forked processes (one torch thread each).

    Returns {name: (model, losses, seconds)}. A job with ``warm_start`` starts once the job it starts from has
    passed that step (its weights come back as safetensors bytes), beyond ``workers`` if need be; ``context`` goes to the on-policy jobs (the
    forked processes inherit it). With workers <= 1, or where fork is unavailable, the jobs run one after
    the other in this process; the results are the same either way (each job seeds its own initialization
    and batch draws).
    """
    import multiprocessing as mp
    import queue as queue_mod

    snapshot_at = _snapshot_steps(jobs)
    snapshots: dict[str, bytes] = {}
    results: dict[str, tuple] = {}
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        for job in sorted(jobs, key=lambda j: j.warm_start is not None):  # warm starts after their sources
            snapshot = None
            if job.name in snapshot_at:
                snapshot = (snapshot_at[job.name],
                            lambda model, opt, name=job.name: snapshots.update({name: _state_bytes(model, opt)}))
            warm = snapshots[job.warm_start[0]] if job.warm_start is not None else None
            if bar_factory is not None:
                with bar_factory(total=job.steps, desc=f"train {job.name}") as bar:
                    results[job.name] = run_job(job, examples, bar, snapshot=snapshot, warm_state=warm, context=context)
            else:
                results[job.name] = run_job(job, examples, snapshot=snapshot, warm_state=warm, context=context)
        return {job.name: results[job.name] for job in jobs}
    ctx = mp.get_context("fork")
    channel = ctx.Queue()
    pending = list(enumerate(jobs))
    running: dict[str, Any] = {}
    by_name = {job.name: job for job in jobs}
    while pending or running:
        # A warm-started job starts as soon as its snapshot arrives, slot or not: it continues its source's work
        # (and its source's share of the cores), rather than waiting for the last ones to finish.
        slots = workers - sum(1 for name in running if by_name[name].warm_start is None)
        ready = [(pos, job) for pos, job in pending if job.warm_start is not None and job.warm_start[0] in snapshots]
        ready += [(pos, job) for pos, job in pending if job.warm_start is None][:max(0, slots)]
        for position, job in ready:
            pending.remove((position, job))
            warm = snapshots[job.warm_start[0]] if job.warm_start is not None else None
            proc = ctx.Process(target=_job_process, args=(job, examples, channel, position, progress,
                                                          snapshot_at.get(job.name), warm, context), daemon=True)
            proc.start()
            running[job.name] = proc
        if not running:
            raise RuntimeError(f"jobs {[job.name for _, job in pending]} wait for a snapshot no job will send")
        try:
            message = channel.get(timeout=2.0)
        except queue_mod.Empty:
            for name, proc in list(running.items()):
                if not proc.is_alive() and proc.exitcode not in (0, None):
                    raise RuntimeError(f"training {name} died (exit code {proc.exitcode})")
            continue
        if message[0] == "snapshot":
            snapshots[message[1]] = message[2]
            continue
        _, name, state, losses, seconds, error = message
        running.pop(name).join()
        if error is not None:
            raise RuntimeError(f"training {name} failed in its worker:\n{error}")
        model = _load_state(by_name[name], state)[0]
        model.eval()
        results[name] = (model, losses, seconds)
    return {job.name: results[job.name] for job in jobs}
