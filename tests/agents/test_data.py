"""distillkit.data: trajectory formats, span-labelled tokenization, truncation, collation.

The tokenizers are built here: a small byte-level BPE trained on generated trajectories, wrapped
in transformers.PreTrainedTokenizerFast, once without and once with a chat template.
"""

import json
import logging

import pytest

from distillkit.data import (DistillationCollator, RenderError, Step, ToolCall, Trajectory, TrajectoryError,
                             TrajectoryTokenizer, TruncationError, detect_format, load_trajectories,
                             parse_trajectory, render_trajectory)
from distillkit.core.spans import PAD_SPAN, Span

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


@pytest.mark.parametrize("record,fmt", [(NATIVE, "native"), (OPENAI, "openai"), (ANTHROPIC, "anthropic"),
                                        (REACT, "react")])
def test_every_format_parses_to_the_same_trajectory(record, fmt):
    assert detect_format(record) == fmt
    parsed = parse_trajectory(record)
    assert parsed.source_format == fmt
    assert same_content(parsed, EXPECTED)


def test_native_round_trip():
    parsed = parse_trajectory(NATIVE)
    assert parsed.id == "t1"
    assert parse_trajectory(parsed.to_dict()) == parsed


def test_openai_parallel_calls_are_matched_by_id():
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "b", "function": {"name": "g", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "b", "content": "result b"},
        {"role": "tool", "tool_call_id": "a", "content": "result a"}]}
    parsed = parse_trajectory(record)
    assert parsed.steps == [Step(None, ToolCall("f", {"x": 1}), "result a"), Step(None, ToolCall("g", {}), "result b")]
    assert parsed.answer is None


def test_anthropic_tool_result_string_and_tools_schema():
    record = {"tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "text", "text": "calling"},
                                          {"type": "tool_use", "id": "x", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "done"}]},
        {"role": "assistant", "content": "all done"}]}
    parsed = parse_trajectory(record)
    assert parsed.steps == [Step("calling", ToolCall("f", {}), "done")]
    assert parsed.answer == "all done"
    assert parsed.tools == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                              "description": "d"}}]


def test_react_inline_action_and_continuation_lines():
    text = "Find x.\nThought: a\nb\nAction: lookup {\"k\": [1, 2]}\nObservation: line 1\nline 2\nFinal Answer: x"
    parsed = parse_trajectory({"text": text})
    assert parsed.user == "Find x."
    assert parsed.steps == [Step("a\nb", ToolCall("lookup", {"k": [1, 2]}), "line 1\nline 2")]
    assert parsed.answer == "x"


def test_plain_rendering_reads_back_as_react(plain_tok):
    trajectory = parse_trajectory({**NATIVE, "tools": [{"type": "function", "function": {"name": "weather"}}]})
    text = render_trajectory(trajectory, plain_tok, add_eos=False).text
    back = parse_trajectory({"text": text})
    assert same_content(back, EXPECTED) and back.tools == trajectory.tools


@pytest.mark.parametrize("record,field,words", [
    ({"steps": []}, "user", "required"),
    ({"user": "q", "steps": [{"reasoning": 3}]}, "steps[0].reasoning", "string"),
    ({"user": "q", "steps": [{"tool_calls": {}}]}, "steps[0]", "unknown key"),
    ({"user": "q", "steps": [{"tool_result": "r"}]}, "steps[0].tool_result", "tool_call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
     "messages[1].role", "without a preceding tool call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "r"}]},
     "messages[1].role", "unknown role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "tool_use", "name": "f", "input": "[1]"}]}]}, "messages[1].content[0].input", "JSON object"),
    ({"text": "Question: q\nObservation: o"}, "text", "without a preceding Action"),
    ({"text": "Question: q\nAction: f\nAction Input: {bad"}, "text", "not valid JSON"),
    ({"hello": 1}, "(record)", "unrecognised record"),
])
def test_malformed_records_name_the_field(record, field, words):
    with pytest.raises(TrajectoryError) as info:
        parse_trajectory(record, line=7)
    assert info.value.line == 7 and info.value.field == field
    assert "line 7" in str(info.value) and field in str(info.value) and words in str(info.value)


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_load_trajectories_all_formats(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [NATIVE, OPENAI, "", ANTHROPIC, REACT])
    loaded = load_trajectories(path)
    assert [t.source_format for t in loaded] == ["native", "openai", "anthropic", "react"]
    assert all(same_content(t, EXPECTED) for t in loaded)
    assert loaded.skipped == 0 and loaded.report.loaded == 4


def test_load_trajectories_raise_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [NATIVE, {"user": 5}, NATIVE])
    with pytest.raises(TrajectoryError, match=r"line 2, field 'user'") as info:
        load_trajectories(path)
    assert (info.value.line, info.value.field) == (2, "user")


def test_load_trajectories_skip_counts(tmp_path, caplog):
    path = write_jsonl(tmp_path / "t.jsonl", [NATIVE, "{oops", OPENAI, {"user": "q", "steps": "x"}, REACT])
    with caplog.at_level(logging.WARNING, logger="distillkit.data"):
        loaded = load_trajectories(path, errors="skip")
    assert len(loaded) == 3 and loaded.skipped == 2
    assert [(e.line, e.field) for e in loaded.errors] == [(2, "(record)"), (4, "steps")]
    assert "skipped 2 malformed" in caplog.text


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


@pytest.fixture(scope="module")
def bpe_json():
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


@pytest.fixture(scope="module")
def plain_tok(bpe_json):
    return wrap(bpe_json, eos_token="<|endoftext|>", pad_token="<|endoftext|>")  # pad == eos on purpose


@pytest.fixture(scope="module")
def chat_tok(bpe_json):
    tok = wrap(bpe_json, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def span_text(tok, example, span) -> str:
    ids = [t for t, s in zip(example["input_ids"], example["span_ids"]) if s == span]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_labels(example, trained=(Span.REASON, Span.ACTION, Span.ANSWER)):
    for token, label, span in zip(example["input_ids"], example["labels"], example["span_ids"]):
        assert label == (token if span in trained else -100)
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_plain_spans_decode_to_their_text(plain_tok):
    encode = TrajectoryTokenizer(plain_tok)
    assert encode.render(EXPECTED).pieces[0][1] == Span.PROMPT
    example = encode(EXPECTED)
    assert span_text(plain_tok, example, Span.PROMPT) == f"System: {SYSTEM}\nUser: {USER}\n"
    assert span_text(plain_tok, example, Span.REASON) == f"Thought: {REASON_1}\nThought: {REASON_2}\n"
    assert span_text(plain_tok, example, Span.ACTION) == f"Action: weather {json.dumps(ARGS)}\n"
    assert span_text(plain_tok, example, Span.OBSERVATION) == f"Observation: {RESULT}\n"
    assert span_text(plain_tok, example, Span.ANSWER) == f"Final Answer: {ANSWER}<|endoftext|>"
    check_labels(example)


def test_chat_template_spans_decode_to_their_turns(chat_tok):
    example = TrajectoryTokenizer(chat_tok)(EXPECTED)
    call = json.dumps({"name": "weather", "arguments": ARGS})
    assert span_text(chat_tok, example, Span.PROMPT) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n")
    assert span_text(chat_tok, example, Span.REASON) == (
        f"<|im_start|>assistant\n{REASON_1}<|im_start|>assistant\n{REASON_2}")
    assert span_text(chat_tok, example, Span.ACTION) == f"\n<tool_call>{call}</tool_call><|im_end|>\n"
    assert span_text(chat_tok, example, Span.OBSERVATION) == (
        f"<|im_start|>tool\n<tool_response>{RESULT}</tool_response><|im_end|>\n")
    assert span_text(chat_tok, example, Span.ANSWER) == f"\n\n{ANSWER}<|im_end|>\n"
    check_labels(example)


def test_chat_template_tools_are_prompt(chat_tok):
    trajectory = Trajectory(user=USER, tools=[{"type": "function", "function": {"name": "weather"}}],
                            steps=[Step(None, ToolCall("weather", ARGS), RESULT)], answer=ANSWER)
    example = TrajectoryTokenizer(chat_tok)(trajectory)
    assert "# Tools" in span_text(chat_tok, example, Span.PROMPT)
    assert span_text(chat_tok, example, Span.ACTION).startswith("<|im_start|>assistant\n\n<tool_call>")
    check_labels(example)


def test_token_across_a_span_boundary_takes_its_first_visible_character(bpe_json):
    tok = wrap(bpe_json, eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE.replace("'\\n<tool_call>'", "'<tool_call>'")
    encode = TrajectoryTokenizer(tok)
    text = encode.render(EXPECTED).text
    assert f"{REASON_1}<tool_call>" in text
    example = encode(EXPECTED)
    pieces = [tok.decode([t]) for t in example["input_ids"]]
    straddle = pieces.index(".<")  # byte-level BPE merges the punctuation run "." + "<tool_call>"
    assert example["span_ids"][straddle] == Span.REASON
    assert example["span_ids"][straddle + 1] == Span.ACTION


def test_chat_template_that_renders_the_last_message_differently_is_an_error(bpe_json):
    # Like Qwen3: an empty think block only on the conversation's last assistant message, so the
    # rendering of a shorter conversation is no prefix of the full one and turn bounds move.
    tok = wrap(bpe_json, eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE.replace(
        "{{ '<|im_start|>assistant\\n' + m.content }}",
        "{{ '<|im_start|>assistant\\n' }}{% if loop.last %}{{ '<think></think>' }}{% endif %}{{ m.content }}")
    assert "<think></think>" in tok.apply_chat_template([{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}], tokenize=False)
    calls_only = Trajectory(user=USER, steps=[Step(None, ToolCall("weather", ARGS), RESULT)], answer=ANSWER)
    with pytest.raises(RenderError, match="tool name"):
        TrajectoryTokenizer(tok)(calls_only)


def test_chat_template_that_rewrites_content_is_an_error(bpe_json):
    tok = wrap(bpe_json, eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE.replace("+ m.content }}", "+ m.content | upper }}")
    with pytest.raises(RenderError, match="cannot find"):
        TrajectoryTokenizer(tok)(EXPECTED)


@pytest.mark.parametrize("fixture", ["plain_tok", "chat_tok"])
def test_eos_is_a_target_when_pad_is_eos(fixture, request):
    tok = request.getfixturevalue(fixture)
    assert tok.pad_token_id == tok.eos_token_id
    example = TrajectoryTokenizer(tok)(EXPECTED)
    last_eos = max(i for i, t in enumerate(example["input_ids"]) if t == tok.eos_token_id)
    assert example["labels"][last_eos] == tok.eos_token_id
    assert example["span_ids"][last_eos] == Span.ANSWER
    short = TrajectoryTokenizer(tok)(Trajectory(user="q", answer="a"))
    batch = DistillationCollator.from_tokenizer(tok)([example, short])
    row = batch["labels"][1]
    n = len(short["input_ids"])
    assert row[:n].tolist() == short["labels"] and (row[n:] == -100).all()
    assert tok.eos_token_id in row[:n].tolist()  # the padded example's own EOS survives collation


def spans_of(example):
    return example["span_ids"]


def test_truncation_drops_the_partial_span(plain_tok):
    full = TrajectoryTokenizer(plain_tok)(EXPECTED)
    spans = spans_of(full)
    reason = [i for i, s in enumerate(spans) if s == Span.REASON]
    first_reason_end = next(i for i in reason if spans[i + 1] != Span.REASON)  # last token of "Thought: …\n"
    cut = reason[0] + 3  # inside the first REASON span
    encode = TrajectoryTokenizer(plain_tok, max_length=cut)
    example = encode(EXPECTED)
    assert len(example["input_ids"]) == cut and example["input_ids"] == full["input_ids"][:cut]
    assert example["span_ids"][:reason[0]] == spans[:reason[0]]  # the prompt keeps its span
    assert example["span_ids"][reason[0]:] == [PAD_SPAN] * 3
    assert example["labels"] == [-100] * cut
    assert (encode.stats.truncated, encode.stats.dropped_partial_spans, encode.stats.empty) == (1, 1, 1)

    with pytest.raises(TruncationError, match="cuts a REASON span"):
        TrajectoryTokenizer(plain_tok, max_length=cut, truncation="error")(EXPECTED)

    on_boundary = TrajectoryTokenizer(plain_tok, max_length=first_reason_end + 1, truncation="error")
    example = on_boundary(EXPECTED)  # the cut falls between spans: nothing is half-labelled
    assert example["span_ids"] == spans[:first_reason_end + 1]
    check_labels(example)
    assert (on_boundary.stats.truncated, on_boundary.stats.dropped_partial_spans) == (1, 0)


def test_truncation_keeps_earlier_spans(chat_tok):
    full = TrajectoryTokenizer(chat_tok)(EXPECTED)
    answer_start = full["span_ids"].index(Span.ANSWER)
    example = TrajectoryTokenizer(chat_tok, max_length=answer_start + 2)(EXPECTED)
    assert example["span_ids"][:answer_start] == full["span_ids"][:answer_start]
    assert example["span_ids"][answer_start:] == [PAD_SPAN, PAD_SPAN]
    assert example["labels"][:answer_start] == full["labels"][:answer_start]


def test_example_without_trainable_tokens_is_reported(plain_tok, caplog):
    encode = TrajectoryTokenizer(plain_tok)
    prompt_only = Trajectory(user="q", id="no-targets")
    with caplog.at_level(logging.WARNING, logger="distillkit.data"):
        kept = encode.tokenize_all([EXPECTED, prompt_only])
    assert len(kept) == 1 and encode.stats.empty == 1 and encode.stats.empty_ids == ["no-targets"]
    assert "no-targets has no trainable token" in caplog.text
    assert len(encode.tokenize_all([prompt_only], drop_empty=False)) == 1


def test_label_spans_option(plain_tok):
    example = TrajectoryTokenizer(plain_tok, label_spans=[Span.ACTION])(EXPECTED)
    check_labels(example, trained=(Span.ACTION,))


def test_needs_a_fast_tokenizer():
    class Slow:
        is_fast = False
    with pytest.raises(TypeError, match="fast tokenizer"):
        TrajectoryTokenizer(Slow())


# ----------------------------------------------------------------------------- collator

def test_collator_pads_every_field():
    torch = pytest.importorskip("torch")
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "span_ids": [0, 1, 4], "attention_mask": [1, 1, 1]},
        {"input_ids": [8], "labels": [8], "span_ids": [2]},  # attention_mask may be left out
    ]
    batch = DistillationCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["span_ids"].tolist() == [[0, 1, 4], [2, PAD_SPAN, PAD_SPAN]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())

    padded = DistillationCollator(pad_token_id=9, pad_to_multiple_of=8)(features)
    assert all(t.shape == (2, 8) for t in padded.values())
    assert padded["input_ids"][0, 3:].tolist() == [9] * 5 and padded["span_ids"][0, 3:].tolist() == [PAD_SPAN] * 5


def test_collator_rejects_bad_features(bpe_json):
    with pytest.raises(ValueError, match="differ in length"):
        DistillationCollator(0)([{"input_ids": [1, 2], "labels": [1], "span_ids": [0, 0]}])
    with pytest.raises(KeyError, match="span_ids"):
        DistillationCollator(0)([{"input_ids": [1], "labels": [1]}])
    no_pad = wrap(bpe_json, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="no pad token"):
        DistillationCollator.from_tokenizer(no_pad)


def test_batch_feeds_span_distillation_loss_after_the_causal_shift(chat_tok):
    torch = pytest.importorskip("torch")
    from distillkit import SpanDistillationLoss
    encode = TrajectoryTokenizer(chat_tok)
    batch = DistillationCollator.from_tokenizer(chat_tok, pad_to_multiple_of=8)(
        [encode(EXPECTED), encode(Trajectory(user="q", answer="a"))])
    batch_size, length = batch["input_ids"].shape
    student = torch.randn(batch_size, length, len(chat_tok), requires_grad=True)
    teacher = torch.randn(batch_size, length, len(chat_tok))
    # Position i predicts token i+1: drop the last logits and the first labels / span ids.
    loss = SpanDistillationLoss(backend="torch")(student[:, :-1], teacher[:, :-1], batch["labels"][:, 1:],
                                                 batch["span_ids"][:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and student.grad.abs().sum() > 0
