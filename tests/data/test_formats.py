"""distillkit.data: the four input formats, malformed records, and loading JSONL (the basics; the
malformed-line corpus is in test_load_errors.py, the fuzz tests in test_load_fuzz.py)."""

import logging

import pytest
from trajectory_samples import ANTHROPIC, EXPECTED, NATIVE, OPENAI, REACT, same_content, write_jsonl

from distillkit.data import (Step, ToolCall, TrajectoryError, detect_format, load_trajectories, parse_trajectory,
                             render_trajectory)

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
    ({"user": "q", "steps": [{"tool_calls": {}}]}, "steps[0].tool_calls", "unknown key"),
    ({"user": "q", "steps": [{"tool_call": {"name": "f", "args": {}}}]}, "steps[0].tool_call.args", "unknown key"),
    ({"user": "q", "steps": [{"reasoning": "r", "tool_call": {"name": "f", "arguments": "{}"}}]},
     "steps[0].tool_call.arguments", "JSON object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[" * 101 + "]" * 101}}]}]},
     "messages[1].tool_calls[0].function.arguments", "nested deeper than 100"),
    ({"user": "q", "tools": [{"function": {"name": "f\udfff"}}]}, "tools[0].function.name", "lone surrogate"),
    ({"user": "q", "tools": [{"a\ud800": 1}]}, "tools[0]", "has a key 'a\\ud800' holding a lone surrogate"),
    ({"text": "Question: q\nAction: f\nAction Input: " + "[" * 200 + "]" * 200}, "text", "nested deeper than 100"),
    ({"text": "Question: q\nAction: f\nAction Input: {\"n\": " + "7" * 5000 + "}"}, "text", "int-string limit"),
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

