"""Tokenizer, tiny Llama models and the training loops of the demo.

Every model is trained by the same small loop with :class:`distillkit.SpanDistillationLoss`
(the product's loss): the teacher and the SFT student with cross-entropy only, the
distilled students with KL to the teacher's logits on reasoning, KL + CE on actions and
answers, and nothing on prompts and observations.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..agents.agent import ReActFormat, encode_trajectory
from ..core.modules import SpanDistillationLoss
from ..core.spans import PAD_SPAN

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


def encode_examples(tokenizer, trajectories: Sequence[Mapping], fmt: ReActFormat = ReActFormat()) -> list[Example]:
    return [Example(*encode_trajectory(tokenizer, t, fmt)) for t in trajectories]


def collate(examples: Sequence[Example], with_teacher: bool = False):
    """Batch tensors: input ids, attention mask, next-token labels and span ids (span of the target)."""
    width = max(len(e.ids) for e in examples)
    size = len(examples)
    ids = torch.full((size, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(size, width, dtype=torch.long)
    labels = torch.full((size, width - 1), -100, dtype=torch.long)
    spans = torch.full((size, width - 1), PAD_SPAN, dtype=torch.long)
    teacher = None
    if with_teacher:
        vocab = examples[0].teacher_logits.shape[-1]
        teacher = torch.zeros(size, width - 1, vocab)
    for row, ex in enumerate(examples):
        n = len(ex.ids)
        ids[row, :n] = torch.tensor(ex.ids)
        mask[row, :n] = 1
        labels[row, :n - 1] = torch.tensor(ex.ids[1:])
        spans[row, :n - 1] = torch.tensor(ex.spans[1:])
        if with_teacher:
            teacher[row, :n - 1] = ex.teacher_logits
    return ids, mask, labels, spans, teacher


@torch.no_grad()
def attach_teacher_logits(teacher, examples: Sequence[Example], batch_size: int = 64,
                          progress: Optional[Callable] = None) -> None:
    """Run the teacher once over the examples and keep its logits (the students see them every epoch)."""
    teacher.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        ids, mask, *_ = collate(chunk)
        logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
        for row, ex in enumerate(chunk):
            ex.teacher_logits = logits[row, :len(ex.ids) - 1].clone()
        if progress is not None:
            progress(len(chunk))


SFT_WEIGHTS = {"reason": (0.0, 1.0), "action": (0.0, 1.0), "answer": (0.0, 1.0)}
# KL on reasoning, KL + CE on actions and answers, nothing on prompts and observations; every
# target token carries the same total weight (2). With (1, 0) on reasoning the reasoning tokens
# get a third of the weight of the others and, in this budget, the student did not learn to copy
# item names from the question into its reasoning.
DISTILL_WEIGHTS = {"reason": (2.0, 0.0), "action": (1.0, 1.0), "answer": (1.0, 1.0)}


def train(model, examples: Sequence[Example], *, steps: int, batch_size: int, lr: float,
          loss_fn: SpanDistillationLoss, distill: bool = False, seed: int = 0, warmup: int = 20,
          weight_decay: float = 0.01, bucket: int = 1, bar=None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; batches drawn at random (the same draws for a seed).

    distill=True passes the cached teacher logits to the loss; otherwise teacher_logits is None
    (the span weights then have no KL term). bucket > 1 draws that many batches at once and groups
    them by length (less padding, but batches of one difficulty: these tiny models then learn the
    copying slower, so the demo keeps 1). Returns the loss per step.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    batches: list[list[Example]] = []
    for step in range(steps):
        if not batches:  # draw `bucket` batches at once and group them by length: less padding
            pool = sorted((examples[rng.randrange(len(examples))] for _ in range(bucket * batch_size)),
                          key=lambda e: len(e.ids))
            batches = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
            rng.shuffle(batches)
        batch = batches.pop()
        ids, mask, labels, spans, teacher = collate(batch, with_teacher=distill)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = loss_fn(logits, teacher, labels, spans)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update(1)
    model.eval()
    return losses


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One student to train: its size, its loss (span weights) and the optimization settings."""

    name: str
    size: ModelSize
    vocab_size: int
    span_weights: tuple  # ((span name, (kl_weight, ce_weight)), ...)
    distill: bool
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    divergence: str = "forward_kl"
    temperature: float = 1.0


def run_job(job: TrainJob, examples: Sequence[Example], bar=None):
    """Build and train one model; returns (model, losses, seconds)."""
    start = time.perf_counter()
    model = make_model(job.vocab_size, job.size, seed=job.seed)
    loss_fn = SpanDistillationLoss(dict(job.span_weights), divergence=job.divergence, temperature=job.temperature)
    losses = train(model, examples, steps=job.steps, batch_size=job.batch_size, lr=job.lr, loss_fn=loss_fn,
                   distill=job.distill, seed=job.seed, bar=bar)
    return model, losses, time.perf_counter() - start


def _job_process(job, examples, queue, position, progress):  # pragma: no cover - runs in a child
    import traceback

    from safetensors.torch import save as save_safetensors

    torch.set_num_threads(1)
    try:
        from tqdm.auto import tqdm

        with tqdm(total=job.steps, desc=f"train {job.name}", position=position, leave=False,
                  disable=not progress, dynamic_ncols=True) as bar:
            model, losses, seconds = run_job(job, examples, bar)
        # safetensors bytes (clones: tied weights may share storage); nothing is pickled.
        state = save_safetensors({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
        queue.put((job.name, state, losses, seconds, None))
    except BaseException:
        queue.put((job.name, None, None, None, traceback.format_exc()))


def run_jobs(jobs: Sequence[TrainJob], examples: Sequence[Example], *, workers: int = 1, progress: bool = True,
             bar_factory: Optional[Callable] = None) -> dict[str, tuple]:
    """Train several models, ``workers`` at a time in forked processes (one torch thread each).

    Returns {name: (model, losses, seconds)}. With workers <= 1, or where fork is unavailable, the
    jobs run one after the other in this process; the results are the same either way (each job
    seeds its own initialization and batch draws).
    """
    import multiprocessing as mp

    from safetensors.torch import load as load_safetensors
    import queue as queue_mod

    results: dict[str, tuple] = {}
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        for job in jobs:
            if bar_factory is not None:
                with bar_factory(total=job.steps, desc=f"train {job.name}") as bar:
                    results[job.name] = run_job(job, examples, bar)
            else:
                results[job.name] = run_job(job, examples)
        return results
    ctx = mp.get_context("fork")
    channel = ctx.Queue()
    pending = list(enumerate(jobs))
    running: dict[str, Any] = {}
    by_name = {job.name: job for job in jobs}
    while pending or running:
        while pending and len(running) < workers:
            position, job = pending.pop(0)
            proc = ctx.Process(target=_job_process, args=(job, examples, channel, position, progress), daemon=True)
            proc.start()
            running[job.name] = proc
        try:
            name, state, losses, seconds, error = channel.get(timeout=2.0)
        except queue_mod.Empty:
            for name, proc in list(running.items()):
                if not proc.is_alive() and proc.exitcode not in (0, None):
                    raise RuntimeError(f"training {name} died (exit code {proc.exitcode})")
            continue
        running.pop(name).join()
        if error is not None:
            raise RuntimeError(f"training {name} failed in its worker:\n{error}")
        job = by_name[name]
        model = make_model(job.vocab_size, job.size, seed=job.seed)
        model.load_state_dict(load_safetensors(state))
        model.eval()
        results[name] = (model, losses, seconds)
    return {job.name: results[job.name] for job in jobs}


class Timer:
    def __init__(self):
        self.start, self.marks = time.perf_counter(), {}

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.marks[name] = round(now - self.start - sum(self.marks.values()), 2)
        return self.marks[name]
