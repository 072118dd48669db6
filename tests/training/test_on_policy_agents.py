"""DistillationTrainer on-policy with an agent rollout: the student acts in a tool environment, the tools answer,
the teacher grades the student's tokens and never the observations."""

from __future__ import annotations

import pytest
import torch

from distillkit.core.spans import Span

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_trainer_trains_on_agent_rollouts_in_a_tool_environment(tmp_path):
    from distillkit.agents.environment import ToolEnvironment
    from distillkit.agents.protocol import ReActFormat, encode_trajectory
    from distillkit.agents.rollout import AgentRollout
    from distillkit.demo import models as M
    from distillkit.demo.env import KeyValueStore, gold_trajectory, make_splits, make_tools
    from distillkit.training.trainer import DistillationConfig, DistillationTrainer

    store = KeyValueStore(0)
    tasks = make_splits({"train": 8}, seed=0, store=store)["train"]
    trajectories = [gold_trajectory(t) for t in tasks]
    raw = M.train_tokenizer([text for t in trajectories for _, text in ReActFormat().segments(t)], vocab_size=128)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    dataset = []
    for trajectory in trajectories:
        ids, spans = encode_trajectory(raw, trajectory)
        trained = [s in (int(Span.REASON), int(Span.ACTION), int(Span.ANSWER)) for s in spans]
        dataset.append({"input_ids": ids, "labels": [i if t else -100 for i, t in zip(ids, trained)],
                        "span_ids": spans})
    student = M.make_model(len(tokenizer), M.ModelSize(16, 1, 2, 32), seed=1)
    teacher = M.make_model(len(tokenizer), M.ModelSize(16, 1, 2, 32), seed=2)
    tools = make_tools(store)
    environments = []

    def environment():
        environments.append(ToolEnvironment(tools))
        return environments[-1]

    rollout = AgentRollout(environment, tokenizer, max_steps=2, seed=0)
    seen = []

    def recording_rollout(model, prompts, config):
        out = rollout(model, prompts, config)
        seen.append((prompts, out))
        return out

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                                          disable_tqdm=True, seed=0, use_cpu=True, dataloader_pin_memory=False)
    config = DistillationConfig(divergence="reverse_kl", on_policy={"fraction": 1.0, "max_new_tokens": 8})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, distill_config=config,
                                  train_dataset=dataset, processing_class=tokenizer, on_policy_rollout=recording_rollout)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert len(seen) == 2 and len(environments) == 8  # one environment per prompt of each on-policy micro-batch
    for prompts, out in seen:
        for prompt, (ids, spans) in zip(prompts, out):
            assert ids[:len(prompt)] == prompt and all(s == int(Span.PROMPT) for s in spans[:len(prompt)])
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(entry["on_policy/fraction"] == 1.0 for entry in logs)
    assert sum(entry["on_policy/generated_tokens"] for entry in logs) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # it trained
    assert all(p.grad is None for p in teacher.parameters())
