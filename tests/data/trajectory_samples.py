"""Shared by the tests of distillkit.data: one trajectory in the four input formats, and the small
byte-level BPE tokenizers (trained here on generated trajectories, wrapped in
transformers.PreTrainedTokenizerFast, once without and once with a chat template)."""

import json

import pytest

from distillkit.core.spans import Span
from distillkit.data import Step, ToolCall, Trajectory

# ----------------------------------------------------------------------------- one trajectory, four formats

SYSTEM = "You are a helpful agent."
USER = "What is the weather in Paris?"
REASON_1 = "I should look up the weather."
ARGS = {"city": "Paris", "unit": "C"}
RESULT = "18C and sunny"
REASON_2 = "The tool answered."
ANSWER = "It is 18C and sunny in Paris."

EXPECTED = Trajectory(user=USER, system=SYSTEM, answer=ANSWER, steps=[
    Step(REASON_1, ToolCall("weather", ARGS), RESULT), Step(REASON_2)])

NATIVE = {"id": "t1", "system": SYSTEM, "user": USER, "answer": ANSWER, "steps": [
    {"reasoning": REASON_1, "tool_call": {"name": "weather", "arguments": ARGS}, "tool_result": RESULT},
    {"reasoning": REASON_2}]}
OPENAI = {"messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": REASON_1, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": json.dumps(ARGS)}}]},
    {"role": "tool", "tool_call_id": "c1", "content": RESULT},
    {"role": "assistant", "content": REASON_2},
    {"role": "assistant", "content": ANSWER}]}
ANTHROPIC = {"system": SYSTEM, "messages": [
    {"role": "user", "content": USER},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": REASON_1},
                                      {"type": "tool_use", "id": "tu1", "name": "weather", "input": ARGS}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu1",
                                  "content": [{"type": "text", "text": RESULT}]}]},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": REASON_2}, {"type": "text", "text": ANSWER}]}]}
REACT = {"system": SYSTEM, "text": (
    f"Question: {USER}\nThought: {REASON_1}\nAction: weather\nAction Input: {json.dumps(ARGS)}\n"
    f"Observation: {RESULT}\nThought: {REASON_2}\nFinal Answer: {ANSWER}")}


def same_content(a: Trajectory, b: Trajectory) -> bool:
    return (a.user, a.system, a.steps, a.answer) == (b.user, b.system, b.steps, b.answer)


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path



# ----------------------------------------------------------------------------- tokenizers built here

CHAT_TEMPLATE = (
    "{%- if tools or messages[0].role == 'system' %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}"
    "{%- if tools %}{{ '\\n# Tools\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{ '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{{ '<|im_start|>tool\\n<tool_response>' + m.content + '</tool_response><|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' + m.content }}"
    "{%- for tc in m.tool_calls or [] %}{{ '\\n<tool_call>' }}"
    "{{ {'name': tc.function.name, 'arguments': tc.function.arguments} | tojson }}{{ '</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

def build_bpe_json() -> str:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = []
    for n in range(40):  # generated trajectories in both renderings
        corpus.append(f"System: {SYSTEM}\nUser: {USER} {n}\nThought: {REASON_1}\nAction: weather "
                      f"{json.dumps(ARGS)}\nObservation: {RESULT}\nThought: {REASON_2}\nFinal Answer: {ANSWER}")
        corpus.append(f"<|im_start|>assistant\n{REASON_1}<tool_call>{json.dumps({'name': 'weather'})}</tool_call>"
                      f"<|im_end|>\n<|im_start|>tool\n<tool_response>{RESULT}</tool_response><|im_end|>")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()

def wrap(bpe_json, **special):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe_json), **special)


def span_text(tok, example, span) -> str:
    ids = [t for t, s in zip(example["input_ids"], example["span_ids"]) if s == span]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_labels(example, trained=(Span.REASON, Span.ACTION, Span.ANSWER)):
    for token, label, span in zip(example["input_ids"], example["labels"], example["span_ids"]):
        assert label == (token if span in trained else -100)
    assert example["attention_mask"] == [1] * len(example["input_ids"])

