"""StudentAgent / Cascade: the ReAct protocol, batched generation, escalation below threshold and counts."""

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from distillkit import Span  # noqa: E402
from distillkit.agents.agent import Cascade, LMPolicy, ReActFormat, StudentAgent, encode_trajectory  # noqa: E402
from distillkit.demo.env import make_tools  # noqa: E402

ALPHABET = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!{}[]\"'+-*/_=()\n"))


def char_tokenizer():
    """One token per character (BPE without merges), built locally."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return tok


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM with the Hugging Face call signature that writes scripted steps.

    script(context_text) -> (step_text, p): the model greedily writes step_text after the context;
    the first token of the step's last line gets probability p and every other token ~1, so the
    step's confidence (P of its action/answer line) is p.
    """

    def __init__(self, tokenizer, script):
        super().__init__()
        self.tok, self.script = tokenizer, script
        self.vocab = tokenizer.get_vocab_size()
        self.weight = torch.nn.Parameter(torch.zeros(self.vocab, 1))
        self.config = SimpleNamespace(eos_token_id=2)

    def get_output_embeddings(self):
        return self

    def _next(self, ids):
        text = self.tok.decode(ids)
        lines = text.split("\n")
        done = [i for i, ln in enumerate(lines[:-1]) if ln.startswith(("Q:", "O:"))]
        cut = len("\n".join(lines[:done[-1] + 1])) + 1
        context, generated = text[:cut], text[cut:]
        step, p = self.script(context)
        if not step.startswith(generated) or len(generated) >= len(step):
            return 2, 1.0
        last_line_start = step.rstrip("\n").rfind("\n") + 1
        return self.tok.token_to_id(step[len(generated)]), (p if len(generated) == last_line_start else 1.0)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **_):
        full = input_ids if past_key_values is None else torch.cat([past_key_values[0], input_ids], 1)
        mask = torch.ones_like(full) if attention_mask is None else attention_mask
        logits = torch.full((full.shape[0], input_ids.shape[1], self.vocab), -1e4)
        for row in range(full.shape[0]):
            ids = full[row][mask[row].bool()].tolist()
            token, p = self._next(ids)
            other = math.log(max(1e-12, (1 - p) / (self.vocab - 1))) if p < 1 else -1e4
            logits[row, -1, :] = other
            logits[row, -1, token] = math.log(p)
        return SimpleNamespace(logits=logits, past_key_values=(full,))


def last_observation(context):
    obs = [ln[3:] for ln in context.split("\n") if ln.startswith("O: ")]
    return obs[-1] if obs else None


def scripted(expr, p_action, p_answer):
    def script(context):
        obs = last_observation(context)
        if obs is None:
            return f'T: add\nA: calc {{"expr":"{expr}"}}\n', p_action
        return f"F: {obs}\n", p_answer
    return script


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_parse_step():
    fmt = ReActFormat()
    step = fmt.parse_step('T: think\nT: more\nA: convert {"value": 3, "from": "km", "to": "m"}\n')
    assert step.reasoning == "think\nmore" and step.error is None
    assert step.tool_call == {"name": "convert", "arguments": {"value": 3, "from": "km", "to": "m"}}
    assert fmt.parse_step("F: 42\n").answer == "42"
    assert "not JSON" in fmt.parse_step('A: calc {"expr": 1+}\n').error
    assert "not a JSON object" in fmt.parse_step("A: calc [1, 2]\n").error
    assert fmt.parse_step("T: only thinking\n").error == "no action or answer line"
    assert fmt.parse_step("garbage\n").error.startswith("unexpected line")


def test_encode_trajectory_spans(tok):
    traj = {"user": "q?", "steps": [{"reasoning": "r", "tool_call": {"name": "calc", "arguments": {"expr": "1"}},
                                     "tool_result": "1"}], "answer": "1"}
    ids, spans = encode_trajectory(tok, traj)
    text = tok.decode(ids)
    assert text == 'Q: q?\nT: r\nA: calc {"expr":"1"}\nO: 1\nF: 1\n'
    assert len(ids) == len(spans)
    expected = ([Span.PROMPT] * 6 + [Span.REASON] * 5 + [Span.ACTION] * len('A: calc {"expr":"1"}\n')
                + [Span.OBSERVATION] * 5 + [Span.ANSWER] * 5)
    assert spans == [int(s) for s in expected]


def test_fallback_escalates_below_threshold_and_counts(tok):
    tools = make_tools()
    queries = ["What is 2+3?", "Add two and three"]
    for threshold, want_tiers, want_answer in ((0.0, [0, 0], "5"), (0.5, [1, 0], "6"), (0.95, [1, 1], "6")):
        student = LMPolicy(ScriptedLM(tok, scripted("2+3", 0.3, 0.9)), tok, name="student")
        teacher = LMPolicy(ScriptedLM(tok, scripted("2+4", 0.99, 0.99)), tok, name="teacher")
        agent = StudentAgent(student, tok, tools, teacher=teacher, threshold=threshold)
        episodes = agent.run(queries)
        for ep in episodes:
            assert ep.error is None and ep.answer == want_answer
            assert [s.tier for s in ep.steps] == want_tiers
            assert ep.steps[0].tool_call == {"name": "calc", "arguments": {"expr": "2+4" if want_tiers[0] else "2+3"}}
            for step in ep.steps:  # escalated exactly when the student's confidence is below the threshold
                assert step.escalated == (step.confidences[0] < threshold)
                assert step.confidences[0] == pytest.approx(0.3 if step.tool_call else 0.9, abs=1e-6)
            assert ep.num_escalations == sum(want_tiers)
        assert StudentAgent.escalation_rate(episodes) == pytest.approx(sum(want_tiers) / 2)
        # every step asks the student; only escalated steps ask the teacher
        assert student.calls == 2 * len(queries) and teacher.calls == sum(want_tiers) * len(queries)
        traj = episodes[0].to_trajectory()
        assert traj["steps"][0]["tool_result"] == want_answer and traj["answer"] == want_answer


def test_cascade_three_tiers(tok):
    tools = make_tools()
    tiers = [LMPolicy(ScriptedLM(tok, scripted("1+1", 0.2, 0.2)), tok),
             LMPolicy(ScriptedLM(tok, scripted("1+2", 0.6, 0.97)), tok),
             LMPolicy(ScriptedLM(tok, scripted("1+3", 0.1, 0.1)), tok)]
    episode = Cascade(tiers, [0.5, 0.9], tools).run_one("q")
    # step 1: 0.2 < 0.5 -> tier 1: 0.6 < 0.9 -> tier 2 (last, always accepted); step 2: tier 1 at 0.97
    assert [s.tier for s in episode.steps] == [2, 1]
    assert episode.answer == "4" and episode.tier_counts(3) == [0, 1, 1]
    assert [len(s.confidences) for s in episode.steps] == [3, 2]
    assert [t.calls for t in tiers] == [2, 2, 1]
    with pytest.raises(ValueError):
        Cascade(tiers, [0.5], tools)


def test_memoized_proposals(tok):
    policy = LMPolicy(ScriptedLM(tok, scripted("2+3", 0.5, 0.5)), tok)
    agent = StudentAgent(policy, tok, make_tools())
    agent.run(["q1", "q2"])
    generated = policy.generated_tokens
    agent.run(["q1", "q2"])
    assert policy.generated_tokens == generated and policy.calls == 8


def tiny_llama(vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_random_models_batched_generation_matches_single(tok):
    policy = LMPolicy(tiny_llama(tok.get_vocab_size(), 0), tok, max_new_tokens=12, memoize=False)
    contexts = [["Q: a\n"], ["Q: a much longer question here?\n", "T: x\n"], ["Q: mid length\n"]]
    batched = policy.propose(contexts)
    single = [policy.propose([c])[0] for c in contexts]
    for b, s in zip(batched, single):
        assert b.text == s.text and b.num_tokens == s.num_tokens
        assert b.confidence == pytest.approx(s.confidence, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.01])
def test_random_models_escalation(tok, threshold):
    vocab = tok.get_vocab_size()
    student = LMPolicy(tiny_llama(vocab, 1), tok, name="student", max_new_tokens=24)
    teacher = LMPolicy(tiny_llama(vocab, 2), tok, name="teacher", max_new_tokens=24)
    agent = StudentAgent(student, tok, make_tools(), teacher=teacher, threshold=threshold, max_steps=3)
    episodes = agent.run(["What is 2+3?", "How many m is 3 km?", "kiwi price?"])
    steps = [s for e in episodes for s in e.steps]
    assert steps and all(e.done for e in episodes)
    for s in steps:
        assert s.escalated == (s.confidences[0] < threshold)
        assert len(s.confidences) == (2 if s.escalated else 1)
    escalated = sum(s.escalated for s in steps)
    assert escalated == (0 if threshold == 0.0 else len(steps) if threshold > 1 else escalated)
    assert StudentAgent.escalation_rate(episodes) == pytest.approx(escalated / len(steps))
    assert student.calls == len(steps) and teacher.calls == escalated


def test_student_alone(tok):
    policy = LMPolicy(ScriptedLM(tok, scripted("6*7", 0.4, 0.4)), tok)
    agent = StudentAgent(policy, tok, make_tools(), threshold=0.99)  # no teacher: never escalates
    ep = agent.run_one("q")
    assert ep.answer == "42" and ep.num_escalations == 0 and len(agent.tiers) == 1
