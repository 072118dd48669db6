"""The demo's on-policy student: warm start from the distilled student's snapshot, rollouts graded by the teacher."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def setup():
    from distillkit.demo import models as M
    from distillkit.demo.env import make_splits, make_tools, KeyValueStore, gold_trajectory, make_ood_split

    store = KeyValueStore(0)
    splits = make_splits({"student": 8}, seed=0, store=store)
    trajs = [gold_trajectory(t) for t in splits["student"]]
    from distillkit.agents.protocol import ReActFormat

    lines = [text for t in trajs for _, text in ReActFormat().segments(t)]
    lines += [text for t in make_ood_split(4, 0, store) for _, text in ReActFormat().segments(gold_trajectory(t))]
    tok = M.train_tokenizer(lines, vocab_size=128)
    examples = M.encode_examples(tok, trajs)
    teacher = M.make_model(tok.get_vocab_size(), M.ModelSize(16, 1, 2, 32), seed=0)
    M.attach_teacher_logits(teacher, examples)
    return M, tok, examples, teacher, make_tools(store), splits["student"]


def _jobs(M, vocab):
    from distillkit.demo.on_policy import ON_POLICY_WEIGHTS, OnPolicyPlan

    size = M.ModelSize(8, 1, 2, 16)
    distilled = M.TrainJob("distilled", size, vocab, tuple(M.DISTILL_WEIGHTS.items()), "logits", 6, 2, 1e-2, seed=3)
    on_policy = M.TrainJob("on_policy", size, vocab, tuple(ON_POLICY_WEIGHTS.items()), "logits", 7, 2, 1e-2, seed=3,
                           warm_start=("distilled", 4),
                           on_policy=OnPolicyPlan(4, rollouts=4, max_steps=2, gen_tokens=8, fraction=0.5))
    return [distilled, on_policy]


def test_on_policy_job_forked_equals_inline(setup):
    from distillkit.demo.on_policy import OnPolicyContext

    M, tok, examples, teacher, tools, tasks = setup
    jobs = _jobs(M, tok.get_vocab_size())
    context = OnPolicyContext(teacher, tok, tools, tasks)
    forked = M.run_jobs(jobs, examples, workers=2, progress=False, context=context)
    inline = M.run_jobs(jobs[::-1], examples, workers=1, progress=False, context=context)  # order: sources first
    for name in ("distilled", "on_policy"):
        assert forked[name][1] == inline[name][1] and len(forked[name][1]) == {"distilled": 6, "on_policy": 3}[name]
        for a, b in zip(forked[name][0].state_dict().values(), inline[name][0].state_dict().values()):
            assert torch.equal(a, b)


def test_warm_start_is_the_source_after_its_step(setup):
    """The on-policy student starts from the distilled student's weights after step k: with no steps after k it
    is exactly the distilled student trained for k steps."""
    import dataclasses

    M, tok, examples, teacher, tools, tasks = setup
    distilled, on_policy = _jobs(M, tok.get_vocab_size())
    short = dataclasses.replace(distilled, steps=4)
    four = M.run_jobs([short], examples, workers=1, progress=False)["distilled"][0]
    from distillkit.demo.on_policy import OnPolicyContext

    zero = dataclasses.replace(on_policy, steps=4)
    out = M.run_jobs([distilled, zero], examples, workers=1, progress=False,
                     context=OnPolicyContext(teacher, tok, tools, tasks))
    for a, b in zip(out["on_policy"][0].state_dict().values(), four.state_dict().values()):
        assert torch.equal(a, b)


def test_a_warm_start_from_a_missing_job_is_an_error(setup):
    M, tok, examples, *_ = setup
    _, on_policy = _jobs(M, tok.get_vocab_size())
    with pytest.raises(ValueError, match="'distilled', which is not among the jobs"):
        M.run_jobs([on_policy], examples, workers=2, progress=False)


def test_rollout_batches_are_graded_by_the_teacher_without_its_gradient(setup):
    from distillkit.core.spans import Span
    from distillkit.demo.on_policy import OnPolicyContext, OnPolicyPlan, RolloutBatches

    M, tok, examples, teacher, tools, tasks = setup
    student = M.make_model(tok.get_vocab_size(), M.ModelSize(8, 1, 2, 16), seed=1)
    student.train()
    on_loss, off_loss = object(), object()
    batches = RolloutBatches(student, OnPolicyContext(teacher, tok, tools, tasks),
                             OnPolicyPlan(0, rollouts=4, passes=2, max_steps=2, gen_tokens=8, fraction=0.5),
                             batch_size=2, seed=0, on_policy_loss=on_loss, examples=examples, off_policy_loss=off_loss)
    drawn = [batches() for _ in range(16)]
    on = [batch for batch, loss in drawn if loss is on_loss]
    off = [batch for batch, loss in drawn if loss is off_loss]
    assert len(on) == batches.on_policy_steps and 0 < len(on) < 16 and len(on) + len(off) == 16  # mixed
    assert all(ex in examples for batch in off for ex in batch)  # off-policy: the teacher's trajectories
    assert batches.episodes >= 4 and batches.generated_tokens > 0 and student.training
    first_round = [id(ex) for batch in on[:4] for ex in batch]
    assert len(set(first_round)) == 4 and len(first_round) == 8  # 4 episodes, each once per pass
    for ex in (ex for batch in on for ex in batch):
        assert ex not in examples and ex.teacher_logits.shape == (len(ex.ids) - 1, tok.get_vocab_size())
        assert not ex.teacher_logits.requires_grad and ex.spans[0] == int(Span.PROMPT)
        with torch.no_grad():
            want = teacher(input_ids=torch.tensor([ex.ids])).logits[0, :-1]
        torch.testing.assert_close(ex.teacher_logits, want, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in teacher.parameters())


def test_warm_start_continues_the_optimizer_and_the_schedule(setup):
    """Off-policy only after the warm start (fraction 0) continues the distilled run's AdamW moments and learning-rate
    schedule: its first step equals the distilled run's step k + 1 on the same batch."""
    from distillkit.core.modules import SpanDistillationLoss

    M, tok, examples, *_ = setup
    loss_fn = SpanDistillationLoss(M.DISTILL_WEIGHTS)
    saved = {}
    reference = M.make_model(tok.get_vocab_size(), M.ModelSize(8, 1, 2, 16), seed=3)
    batch = examples[:2]
    calls = iter([(examples[2:4], loss_fn)] * 4 + [(batch, loss_fn)])
    M.train(reference, (), steps=5, batch_size=2, lr=1e-2, loss_fn=loss_fn, teacher="logits",
            next_batch=lambda: next(calls), snapshot=(4, lambda m, o: saved.update(state=M._state_bytes(m, o))))
    job = M.TrainJob("x", M.ModelSize(8, 1, 2, 16), tok.get_vocab_size(), (), "logits", 5, 2, 1e-2, seed=3)
    model, optimizer_state = M._load_state(job, saved["state"])
    assert optimizer_state and all("exp_avg" in s for s in optimizer_state.values())
    M.train(model, (), steps=5, batch_size=2, lr=1e-2, loss_fn=loss_fn, teacher="logits",
            next_batch=lambda: (batch, loss_fn), start_step=4, optimizer_state=optimizer_state)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_ood_split_has_longer_tasks_than_any_training_task():
    from distillkit.demo.env import KeyValueStore, check_answer, make_ood_split, make_splits

    store = KeyValueStore(0)
    ood = make_ood_split(20, 0, store)
    assert [t.num_steps for t in ood] == [5, 6] * 10
    assert len({t.question for t in ood}) == 20
    splits = make_splits({"test": 40, "train": 200}, seed=0, store=store, repeats=("train",))
    assert max(t.num_steps for s in splits.values() for t in s) == 4
    assert not {t.question for t in ood} & {t.question for s in splits.values() for t in s}
    from distillkit.demo.env import make_tools

    tools = make_tools(store)
    for task in ood:  # the gold plan, executed with the real tools, gives the answer
        results = [tools[c["name"]](**c["arguments"]) for c in task.plan]
        assert results == task.results and check_answer(task, results[-1])
    assert make_ood_split(20, 0, store) == ood  # deterministic
