"""On-policy distillation (distillkit/training/on_policy.py): config, generation, the loss on generated tokens
against a float64 transcription, the teacher's and the generation's gradients, exact gradient accumulation
over generated batches of different lengths, bit-identical off-policy training, logging."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from distillkit.core.spans import PAD_SPAN, Span
from distillkit.data import DistillationCollator
from distillkit.training.coerce import ConfigError
from distillkit.training.on_policy import (ON_POLICY, ContinuationRollout, OnPolicyConfig, make_on_policy,
                                           prompts_of, rollout_batch, sample_continuations)
from distillkit.training.run_config import load_config
from distillkit.training.trainer import DistillationConfig, DistillationTrainer
from trainer_helpers import batch_of, make_trainer, models, num_items, train_logs, training_args

transformers = pytest.importorskip("transformers")


def on_policy_config(fraction=1.0, *, max_new_tokens=6, temperature=1.0, **options):
    options = {"divergence": "reverse_kl", **options}
    return DistillationConfig(on_policy={"fraction": fraction, "max_new_tokens": max_new_tokens,
                                         "temperature": temperature}, **options)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("values,key", [({"fraction": 1.5}, "on_policy.fraction"),
                                        ({"fraction": "half"}, "on_policy.fraction"),
                                        ({"max_new_tokens": 0}, "on_policy.max_new_tokens"),
                                        ({"temperature": -1}, "on_policy.temperature"),
                                        ({"span": "observation"}, "on_policy.span"),
                                        ({"fractoin": 0.5}, "on_policy.fractoin")])
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        DistillationConfig.from_dict({"on_policy": values})
    assert info.value.key == key and str(info.value).startswith(key + ":")
    with pytest.raises(ConfigError) as info:
        DistillationConfig(on_policy=12)
    assert info.value.key == "on_policy"


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    config = DistillationConfig(divergence="reverse_kl", on_policy={"fraction": "0.5", "max_new_tokens": "32",
                                                                    "temperature": 0, "span": "REASON"})
    assert config.on_policy == OnPolicyConfig(fraction=0.5, max_new_tokens=32, temperature=0.0, span="reason")
    assert DistillationConfig.from_dict(config.to_dict()) == config
    assert DistillationConfig(on_policy=config.on_policy).on_policy is config.on_policy
    (tmp_path / "run.yaml").write_text(
        "student: {config: {model_type: llama}}\nteacher: {config: {model_type: llama}}\ntokenizer: tok\n"
        "data: {train: train.jsonl}\noutput_dir: out\n"
        "loss:\n  divergence: reverse_kl\n  on_policy: {fraction: 0.5, max_new_tokens: 32, temperature: 0.7}\n")
    loaded = load_config(tmp_path / "run.yaml")
    assert loaded["loss"]["on_policy"] == {"fraction": 0.5, "max_new_tokens": 32, "temperature": 0.7,
                                           "span": "answer"}
    assert DistillationConfig.from_dict(loaded["loss"]).on_policy.fraction == 0.5
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "run.yaml", ["loss.on_policy.fraction=2"])
    assert info.value.key == "loss.on_policy.fraction"


# ----------------------------------------------------------------------------- generation and batches


def likely_eos(student, eos, strength=0.5):
    """Make eos likely, so that rows stop at different steps."""
    with torch.no_grad():
        student.lm_head.weight[eos] += strength * student.lm_head.weight.mean(0)


def test_greedy_rollout_matches_generate_and_builds_the_batch(workspace):
    """Batched, left-padded, KV-cached greedy continuation == transformers' generate on each prompt alone."""
    tok = workspace["tokenizer"]
    student, _ = models(workspace, dtype=torch.float64)
    student.eval()
    batch = batch_of(workspace, [3, 17, 5])
    prompts = prompts_of(batch)
    for row, prompt in enumerate(prompts):  # the tokens before the completion start
        first = int((batch["labels"][row] != -100).nonzero()[0])
        assert prompt == batch["input_ids"][row, :first].tolist()
    prompts = [p[:len(p) - 4 * i] for i, p in enumerate(prompts)]  # different lengths: left padding matters
    eos = tok.eos_token_id
    likely_eos(student, eos)
    generated = sample_continuations(student, prompts, max_new_tokens=12, temperature=0, eos_token_ids=[eos],
                                     pad_token_id=tok.pad_token_id)
    for prompt, gen in zip(prompts, generated):
        ref = student.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        ref = ref[0, len(prompt):].tolist()
        if eos in ref:
            ref = ref[:ref.index(eos) + 1]
        assert gen == ref
    rollouts = ContinuationRollout(tok.pad_token_id, [eos])(student, prompts, OnPolicyConfig(temperature=0,
                                                                                           max_new_tokens=12))
    new = rollout_batch(rollouts, tok.pad_token_id)
    assert new[ON_POLICY] is True
    for row, (prompt, gen) in enumerate(zip(prompts, generated)):
        n, total = len(prompt), len(prompt) + len(gen)
        assert new["input_ids"][row, :total].tolist() == prompt + gen
        assert new["labels"][row].tolist() == [-100] * n + gen + [-100] * (new["labels"].shape[1] - total)
        assert new["span_ids"][row].tolist() == ([int(Span.PROMPT)] * n + [int(Span.ANSWER)] * len(gen)
                                                 + [PAD_SPAN] * (new["labels"].shape[1] - total))
        assert new["attention_mask"][row].sum() == total
    # An agent rollout's observation tokens are context, never labels.
    agent = rollout_batch([([5, 6, 7, 8, 9], [0, 1, 3, 3, 2])], tok.pad_token_id)
    assert agent["labels"].tolist() == [[-100, 6, -100, -100, 9]]
    with pytest.raises(ValueError, match="one span id per token"):
        rollout_batch([([5, 6], [0])], 0)


# ----------------------------------------------------------------------------- the loss


def _generated_step(trainer, batches):
    """The trainer's get_batch_samples over collated micro-batches (an on-policy step when fraction = 1)."""
    return trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)


def shortened_batch(workspace, indices, cuts):
    """A collated batch of the examples without their first `cut` tokens: prompts of different lengths."""
    collate = DistillationCollator.from_tokenizer(workspace["tokenizer"])
    return collate([{k: v[cut:] for k, v in workspace["examples"][i].items()} for i, cut in zip(indices, cuts)])


def _trainer(workspace, tmp_path, student, teacher, config, **args):
    return make_trainer(workspace, tmp_path, student, teacher, config=config, **args)


def _direct_reverse_kl(student, teacher, batch, normalizer):
    """float64 transcription: sum over generated targets of KL(q || p), q the student's and p the teacher's
    next-token distribution at the position before each generated token, divided by the normalizer."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        q = torch.log_softmax(student(**kwargs).logits.double(), -1)[:, :-1]
        p = torch.log_softmax(teacher(**kwargs).logits.double(), -1)[:, :-1]
    generated = batch["labels"][:, 1:] != -100
    kl = (q.exp() * (q - p)).sum(-1)
    return (kl * generated).sum() / normalizer


@pytest.mark.parametrize("logits_free,dtype", [(False, torch.float64), (True, torch.float32)])
def test_loss_on_generated_tokens_is_reverse_kl(workspace, tmp_path, logits_free, dtype):
    student, teacher = models(workspace, dtype=dtype)
    config = on_policy_config(use_logits_free=logits_free, backend="torch" if dtype == torch.float64 else "auto",
                              span_weights={"action": (0.0, 1.0)})  # the off-policy table is not used
    trainer = _trainer(workspace, tmp_path, student, teacher, config)
    torch.manual_seed(0)
    (batch,), n = _generated_step(trainer, [shortened_batch(workspace, [3, 17, 5, 30], [0, 2, 5, 9])])
    assert batch[ON_POLICY] and int(n) == num_items(batch) > 0
    loss = trainer.compute_loss(student, batch, num_items_in_batch=n)
    assert trainer.last_path == ("logits_free" if logits_free else "logits")
    expected = _direct_reverse_kl(student, teacher, batch, int(n))
    # The op computes in fp32 (whatever the inputs' dtype); the small KL of nearby distributions cancels
    # log-probabilities of order log V, hence fp32 rounding ~1e-5 relative.
    torch.testing.assert_close(loss.double(), expected, rtol=3e-5, atol=0)
    assert trainer.loss_fn.weight_table[int(Span.ACTION), 1] == 1  # restored after the on-policy batch


def test_generation_has_no_grad_and_the_teacher_none(workspace, tmp_path):
    student, teacher = models(workspace)
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs.get("use_cache"), torch.is_grad_enabled(), module.training))

    student.register_forward_pre_hook(hook, with_kwargs=True)
    teacher_calls = []
    teacher.register_forward_pre_hook(lambda m, a, k: teacher_calls.append(torch.is_grad_enabled()),
                                      with_kwargs=True)
    trainer = _trainer(workspace, tmp_path, student, teacher, on_policy_config(), max_steps=2)
    trainer.train()
    generation = [c for c in calls if c[0]]
    training = [c for c in calls if not c[0]]
    assert generation and training
    assert all(not grad and not mode for _, grad, mode in generation)  # no_grad, eval mode
    assert all(grad and mode for _, grad, mode in training)  # restored for the loss
    assert teacher_calls and not any(teacher_calls)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_gradient_accumulation_over_generated_batches_is_exact(workspace, tmp_path):
    """Two generated micro-batches of different lengths, normalized by the recounted num_items_in_batch, give
    the loss and gradient of one batch holding both."""
    student, teacher = models(workspace, dtype=torch.float64)
    trainer = _trainer(workspace, tmp_path, student, teacher, on_policy_config(max_new_tokens=9, backend="torch"),
                       per_device_train_batch_size=2, gradient_accumulation_steps=2)
    torch.manual_seed(3)
    batches, n = _generated_step(trainer, [shortened_batch(workspace, [3, 17], [0, 2]),
                                           shortened_batch(workspace, [5, 30], [6, 9])])
    assert all(b[ON_POLICY] for b in batches)
    lengths = [b["attention_mask"].sum(1).tolist() for b in batches]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1], lengths
    assert len(set(lengths[0] + lengths[1])) > 2, lengths  # rows of different lengths too
    assert int(n) == sum(num_items(b) for b in batches)  # the generated labels, not the dataset's
    params = list(student.parameters())

    def run(micro_batches):
        for p in params:
            p.grad = None
        total = 0.0
        for batch in micro_batches:
            loss = trainer.compute_loss(student, batch, num_items_in_batch=n)
            loss.backward()
            total = total + loss.detach()
        return total, [p.grad.clone() for p in params]

    width = max(b["input_ids"].shape[1] for b in batches)
    pads = {"input_ids": workspace["tokenizer"].pad_token_id, "attention_mask": 0, "labels": -100,
            "span_ids": PAD_SPAN}
    whole = {k: torch.cat([nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=v) for b in batches])
             for k, v in pads.items()}
    whole[ON_POLICY] = True
    parts_loss, parts_grads = run(batches)
    whole_loss, whole_grads = run([whole])
    # The op computes in fp32: the two differ by the order of fp32 sums only.
    torch.testing.assert_close(parts_loss, whole_loss, rtol=1e-6, atol=0)
    for a, b in zip(parts_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)
    expected = sum(_direct_reverse_kl(student, teacher, b, int(n)) for b in batches)
    torch.testing.assert_close(whole_loss.double(), expected, rtol=3e-5, atol=0)


# ----------------------------------------------------------------------------- training


def test_fraction_zero_is_bit_identical_and_fraction_one_always_on_policy(workspace, tmp_path):
    runs = {}
    for name, on_policy in (("plain", None), ("zero", {"fraction": 0.0})):
        student, teacher = models(workspace)
        config = DistillationConfig(divergence="jsd", on_policy=on_policy)
        trainer = _trainer(workspace, tmp_path / name, student, teacher, config, max_steps=3)
        trainer.train()
        runs[name] = (train_logs(trainer), [p.detach().clone() for p in student.parameters()])
    for a, b in zip(runs["plain"][0], runs["zero"][0]):
        assert a["loss"] == b["loss"] and b["on_policy/fraction"] == 0.0 and b["on_policy/generated_tokens"] == 0
    assert all(torch.equal(a, b) for a, b in zip(runs["plain"][1], runs["zero"][1]))

    student, teacher = models(workspace)
    trainer = _trainer(workspace, tmp_path / "one", student, teacher, on_policy_config(), max_steps=3,
                       gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 3
    for entry in logs:
        assert entry["on_policy/fraction"] == 1.0
        assert 0 < entry["on_policy/generated_tokens"] <= 2 * 2 * 6
        assert entry["on_policy/kl/answer"] > 0 and "kl/answer" not in entry  # no off-policy batch
    half = trainer.on_policy
    half.config = OnPolicyConfig(fraction=0.5)
    decisions = [half.is_on_policy_step(0, step) for step in range(200)]
    assert 70 < sum(decisions) < 130 and decisions == [half.is_on_policy_step(0, s) for s in range(200)]


class ToyTeacher(nn.Module):
    """Next-token distribution independent of the context: softmax(row), token `mode` dominant."""

    def __init__(self, vocab_size, mode):
        super().__init__()
        row = torch.full((vocab_size,), -3.0)
        row[mode] = 6.0  # p(mode) ~ 0.95 with the tiny vocabulary
        self.register_buffer("row", row)
        self.scale = nn.Parameter(torch.ones(()))  # a parameter that must never get a gradient
        self.config = types.SimpleNamespace(vocab_size=vocab_size)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = (self.scale * self.row).expand(*input_ids.shape, -1)
        return types.SimpleNamespace(logits=logits)


def test_on_policy_reverse_kl_moves_samples_to_the_teachers_mode(workspace, tmp_path):
    tok = workspace["tokenizer"]
    student, _ = models(workspace)
    mode = next(i for i in range(7, len(tok)) if i not in (tok.eos_token_id, tok.pad_token_id))
    teacher = ToyTeacher(len(tok), mode)
    prompts = prompts_of(batch_of(workspace, range(8)))

    def mode_frequency():
        torch.manual_seed(123)
        student.eval()
        generated = sample_continuations(student, prompts, max_new_tokens=6, temperature=1.0,
                                         eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        tokens = [t for row in generated for t in row]
        return sum(t == mode for t in tokens) / len(tokens)

    before = mode_frequency()
    trainer = _trainer(workspace, tmp_path, student, teacher, on_policy_config(use_logits_free=False), max_steps=12,
                       learning_rate=3e-2)
    trainer.train()
    after = mode_frequency()
    assert before < 0.1 and after > 0.5, (before, after)
    assert teacher.scale.grad is None
    logs = train_logs(trainer)
    assert logs[-1]["on_policy/kl/answer"] < logs[0]["on_policy/kl/answer"]


def test_custom_rollout_and_errors(workspace, tmp_path):
    """The rollout hook: observation tokens are context; a rollout without on_policy or with a cache is an
    error."""
    student, teacher = models(workspace)
    seen = []

    def rollout(model, prompts, config):
        seen.append((len(prompts), config.max_new_tokens, torch.is_grad_enabled(), model.training))
        obs = [11, 12]
        return [(p + [5, 6] + obs + [7], [0] * len(p) + [1, 2, 3, 3, 4]) for p in prompts]

    def build(config):
        return DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                   distill_config=config, train_dataset=workspace["examples"],
                                   processing_class=workspace["tokenizer"], on_policy_rollout=rollout)

    trainer = build(on_policy_config())
    (batch,), n = _generated_step(trainer, [shortened_batch(workspace, [1, 2], [0, 3])])
    assert seen == [(2, 6, False, False)] and student.training
    assert int(n) == 2 * 3  # 5, 6 and 7 per row: the observation tokens 11, 12 are context
    for labels, length in zip(batch["labels"].tolist(), batch["attention_mask"].sum(1).tolist()):
        assert labels[length - 5:length] == [5, 6, -100, -100, 7]
    trainer.on_policy.rollout = lambda model, prompts, config: rollout(model, prompts, config)[:1]
    with pytest.raises(ValueError, match="returned 1 sequences for 2 prompts"):
        _generated_step(trainer, [shortened_batch(workspace, [1, 2], [0, 3])])
    assert student.training  # restored after the failure too
    fake = types.SimpleNamespace(distill_config=on_policy_config(), teacher_cache=object())
    with pytest.raises(ValueError, match="needs teacher_model"):
        make_on_policy(fake, None)
    with pytest.raises(ValueError, match="needs distill_config.on_policy"):
        build(DistillationConfig())


# ----------------------------------------------------------------------------- data parallel

DDP_STEPS, DDP_SEED = 4, 1  # with fraction 0.5 and seed 1, steps 1 and 3 are on-policy


def _uneven_rollout(model, prompts, config):
    """Greedy continuations cut to 1 + len(prompt) % 5 tokens: the ranks' halves carry different counts."""
    full = ContinuationRollout(0)(model, prompts, config)
    return [(ids[:len(p) + 1 + len(p) % 5], spans[:len(p) + 1 + len(p) % 5]) for p, (ids, spans) in zip(prompts, full)]


def _ddp_train(workspace, out, batch_size, **extra):
    student, teacher = models(workspace)
    initial = [p.detach().clone() for p in student.parameters()]
    config = on_policy_config(0.5, temperature=0, span_weights={"answer": (1.0, 0.5)})
    args = training_args(out, max_steps=DDP_STEPS, per_device_train_batch_size=batch_size, learning_rate=0.5,
                         optim="sgd", train_sampling_strategy="sequential", seed=DDP_SEED, **extra)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, distill_config=config,
                                  train_dataset=workspace["examples"], processing_class=workspace["tokenizer"],
                                  on_policy_rollout=_uneven_rollout)
    trainer.train()
    return {"logs": train_logs(trainer), "world": trainer.accelerator.num_processes,
            "updates": [p.detach() - p0 for p, p0 in zip(student.parameters(), initial)]}


def _ddp_worker(rank, world, port, tokenizer_path, examples, out_dir):
    import os
    from helpers import launch_env, worker_process
    launch_env(rank, world, port)
    with worker_process():
        workspace = {"tokenizer": transformers.AutoTokenizer.from_pretrained(tokenizer_path), "examples": examples}
        result = _ddp_train(workspace, os.path.join(out_dir, f"rank{rank}"), 2, ddp_backend="gloo")
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "ddp.pt"))


@pytest.mark.slow  # two spawned processes: ~15 s idle, more on a loaded machine
def test_ddp_on_policy_matches_one_process(workspace, tmp_path):
    """2 processes x 2 rows == 1 process x 4 rows with on-policy steps: the same decision on both ranks, and
    num_items_in_batch recounted over both ranks' generated tokens (their halves differ in length)."""
    from helpers import free_port, spawn_and_wait
    examples = [{k: v[i % 6:] for k, v in workspace["examples"][i].items()} for i in range(32)]  # prompt lengths
    spawn_and_wait(_ddp_worker, (2, free_port(), workspace["paths"]["tokenizer"], examples, str(tmp_path)), 2, 240,
                   "DDP workers")
    two = torch.load(tmp_path / "ddp.pt")
    one = _ddp_train({"examples": examples, "tokenizer": workspace["tokenizer"]}, tmp_path / "single", 4)
    assert (one["world"], two["world"]) == (1, 2)
    assert [e["on_policy/fraction"] for e in one["logs"]] == [0.0, 1.0, 0.0, 1.0]
    for a, b in zip(one["logs"], two["logs"]):
        for key in ("loss", "on_policy/fraction", "on_policy/generated_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    for a, b in zip(one["updates"], two["updates"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
