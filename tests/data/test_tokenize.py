"""distillkit.data: rendering, span-labelled tokenization, truncation, the tokenizer's stats and errors,
and collation (tokenizers from trajectory_samples.py, built in conftest.py)."""

import json
import logging
import sys

import pytest
from trajectory_samples import (ARGS, ANSWER, CHAT_TEMPLATE, EXPECTED, REASON_1, REASON_2, RESULT, SYSTEM, USER,
                                check_labels, span_text, wrap)

from distillkit.core.spans import PAD_SPAN, Span
from distillkit.data import (DistillationCollator, RenderError, Step, TokenizeStats, ToolCall, Trajectory,
                             TrajectoryError, TrajectoryTokenizer, TruncationError)


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


def test_stats_describe_the_last_tokenize_all_call(plain_tok):
    encode = TrajectoryTokenizer(plain_tok)
    encode.tokenize_all([EXPECTED, Trajectory(user="q", id="prompt-only"), EXPECTED])
    first = encode.stats
    assert (first.examples, first.empty, first.empty_ids) == (3, 1, ["prompt-only"])
    encode.tokenize_all([EXPECTED])
    assert encode.stats == TokenizeStats(examples=1)
    assert first.examples == 3  # the previous call's stats object is left as it was
    encode.tokenize_all([])
    assert encode.stats == TokenizeStats()


@pytest.mark.parametrize("fixture", ["plain_tok", "chat_tok"])
def test_lone_surrogate_names_the_trajectory_and_field(fixture, request):
    encode = TrajectoryTokenizer(request.getfixturevalue(fixture))
    bad = Trajectory(user=USER, id="bad", steps=[Step(REASON_1, ToolCall("weather", ARGS), "18C \ud800")],
                     answer=ANSWER)
    with pytest.raises(TrajectoryError) as info:
        encode.tokenize_all([EXPECTED, bad])
    assert (info.value.trajectory, info.value.field) == ("'bad' (index 1)", "steps[0].tool_result")
    assert str(info.value).startswith("trajectory 'bad' (index 1), field 'steps[0].tool_result': holds a lone "
                                      "surrogate (U+D800) at character 5")
    with pytest.raises(TrajectoryError, match=r"^trajectory #0, field 'user': holds a lone surrogate"):
        encode.tokenize_all([Trajectory(user="\udc80", answer=ANSWER)])


def test_other_errors_of_tokenize_all_name_the_trajectory(plain_tok):
    not_json = Trajectory(user="q", id="odd", steps=[Step(None, ToolCall("f", {"x": {1, 2}}))])  # a set
    with pytest.raises(TypeError, match="not JSON serializable") as info:
        TrajectoryTokenizer(plain_tok).tokenize_all([EXPECTED, EXPECTED, not_json])
    if sys.version_info >= (3, 11):  # exception notes
        assert info.value.__notes__ == ["while tokenizing trajectory 'odd' (index 2)"]
    with pytest.raises(TruncationError, match=r"^trajectory #0: max_length=3 cuts a PROMPT span"):
        TrajectoryTokenizer(plain_tok, max_length=3, truncation="error").tokenize_all([EXPECTED])


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
    with pytest.raises(ValueError, match="lacks labels"):
        DistillationCollator(0)([{"input_ids": [1], "span_ids": [0]}])
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

