"""distillkit.agents.environment: the environment protocol, rollouts through it, and their training encoding."""

import pytest

from distillkit.agents.agent import Cascade
from distillkit.agents.environment import Environment, ToolEnvironment, encode_episode, line_span
from distillkit.agents.rollout import AgentRollout, rollout
from distillkit.agents.policy import LMPolicy, Proposal
from distillkit.agents.protocol import ReActFormat, encode_text
from distillkit.core.spans import Span

pytest.importorskip("tokenizers")


class ScriptedPolicy(LMPolicy):
    """Proposes the next step of a fixed script (by the number of steps already in the context)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.fmt, self.script, self.name = tokenizer, ReActFormat(), script, "scripted"
        self.bos_id, self.calls = None, 0

    def propose(self, contexts):
        self.calls += len(contexts)
        out = []
        for lines in contexts:
            done = sum(1 for ln in lines if ln.startswith("A:"))
            out.append(Proposal(self.script[min(done, len(self.script) - 1)], 0.9, 3))
        return out


class Counter:
    """A user's environment: a counter the agent increments; it ends the episode on an answer."""

    instances = 0

    def __init__(self):
        Counter.instances += 1
        self.value, self.actions = None, []

    def reset(self, task):
        self.value = task["start"]
        return f"Start at {task['start']} and add twice."

    def step(self, action):
        self.actions.append(action)
        if action.answer is not None:
            return "", True
        self.value += int(action.tool_call["arguments"]["by"])
        return f"now {self.value}", False


SCRIPT = ['T: Add one.\nA: add {"by":1}', 'T: Add two.\nA: add {"by":2}', "F: done"]


@pytest.fixture(scope="module")
def tokenizer():
    from distillkit.demo.models import train_tokenizer

    return train_tokenizer(["Q: Start at 4 and add twice.\n", "T: Add one.\n", 'A: add {"by":1}\n', "O: now 5\n",
                            "F: done\n", "O: error: unknown tool 'add'\n"], vocab_size=96)


def test_a_user_environment_plugs_into_the_agent_loop(tokenizer):
    Counter.instances = 0
    policy = ScriptedPolicy(tokenizer, SCRIPT)
    episodes = rollout(policy, [{"start": 4}, {"start": 10}], Counter, max_steps=5)
    assert Counter.instances == 2  # one environment per episode
    assert [e.answer for e in episodes] == ["done", "done"]
    assert [s.tool_result for s in episodes[1].steps] == ["now 11", "now 13", None]
    assert episodes[0].lines == ["Q: Start at 4 and add twice.\n", "T: Add one.\n", 'A: add {"by":1}\n', "O: now 5\n",
                                 "T: Add two.\n", 'A: add {"by":2}\n', "O: now 7\n", "F: done\n"]
    assert isinstance(Counter(), Environment) and isinstance(ToolEnvironment({}), Environment)


def test_tools_and_environment_are_exclusive(tokenizer):
    policy = ScriptedPolicy(tokenizer, SCRIPT)
    with pytest.raises(ValueError, match="exactly one"):
        Cascade([policy], [], {"add": lambda by: by}, environment=Counter)
    with pytest.raises(ValueError, match="exactly one"):
        Cascade([policy], [])


def test_tool_environment_runs_tools_and_ends_on_an_answer():
    from distillkit.agents.protocol import ParsedStep

    env = ToolEnvironment({"double": lambda x: 2 * x})
    assert env.reset("What is 2x3?") == "What is 2x3?"
    assert env.step(ParsedStep(tool_call={"name": "double", "arguments": {"x": 3}})) == ("6", False)
    assert env.step(ParsedStep(tool_call={"name": "nope", "arguments": {}}))[0].startswith("error: unknown tool")
    assert env.step(ParsedStep(answer="6")) == ("", True)
    with pytest.raises(ValueError, match="neither a tool call nor an answer"):
        env.step(ParsedStep())


def test_encoded_rollouts_mask_observations_and_keep_the_agent_text(tokenizer):
    from distillkit.core.modules import span_token_weights
    from distillkit.demo.on_policy import ON_POLICY_WEIGHTS
    from distillkit.core.modules import SpanDistillationLoss
    import torch

    episode = rollout(ScriptedPolicy(tokenizer, SCRIPT), [{"start": 4}], Counter)[0]
    ids, spans = encode_episode(tokenizer, episode)
    assert ids == [i for line in episode.lines for i in encode_text(tokenizer, line)]
    observed = [i for i, s in zip(ids, spans) if s == Span.OBSERVATION]
    assert observed == encode_text(tokenizer, "O: now 5\n") + encode_text(tokenizer, "O: now 7\n")
    weights = span_token_weights(SpanDistillationLoss(ON_POLICY_WEIGHTS).effective_table(), torch.tensor(spans))
    trained = weights[:, 0] != 0
    assert not trained[torch.tensor(spans) == int(Span.OBSERVATION)].any()  # never trained on
    assert not trained[torch.tensor(spans) == int(Span.PROMPT)].any()
    assert trained[torch.tensor(spans) == int(Span.ACTION)].all() and (weights[:, 1] == 0).all()  # no CE


def test_an_unparseable_step_is_kept_for_training_as_the_agent_wrote_it(tokenizer):
    episode = rollout(ScriptedPolicy(tokenizer, ["T: Add one.\nzz garbage"]), [{"start": 1}], Counter)[0]
    assert episode.error.startswith("unparseable step") and episode.answer is None
    assert episode.lines[-2:] == ["T: Add one.\n", "zz garbage\n"]
    assert line_span("zz garbage\n", ReActFormat()) == Span.REASON  # the agent's text: graded
    assert line_span("O: 5\n", ReActFormat()) == Span.OBSERVATION


def test_agent_rollout_for_the_trainer(tokenizer):
    """AgentRollout: prompt ids in, (ids, spans) of whole episodes out, the model's training mode restored."""
    from types import SimpleNamespace

    from distillkit.demo.models import make_model, ModelSize

    model = make_model(tokenizer.get_vocab_size(), ModelSize(16, 1, 2, 32), seed=0)
    model.train()
    seen = []

    class Recorder(Counter):
        def reset(self, task):
            seen.append(task)
            self.value = 0
            return task

    roll = AgentRollout(Recorder, tokenizer, max_steps=2, seed=1)
    prompt = encode_text(tokenizer, "Q: Start at 4 and add twice.\n")
    config = SimpleNamespace(max_new_tokens=6, temperature=1.0)
    out = roll(model, [prompt, prompt], config)
    assert seen == ["Start at 4 and add twice."] * 2 and model.training
    for ids, spans in out:
        assert ids[:len(prompt)] == prompt and set(spans[:len(prompt)]) == {int(Span.PROMPT)}
        assert len(ids) == len(spans) > len(prompt)  # the model wrote something (a random model: anything)
