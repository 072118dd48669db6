"""load_trajectories on malformed input: every line-level failure is a TrajectoryError naming file, line
and field, and errors="skip" leaves out exactly that line (docs/DATA.md, "Errors").

The corpus is tests/data/malformed/: one small file per case, the bad line between valid ones (the four
sample formats of trajectory_samples.py, each the trajectory EXPECTED).
"""

import json
import sys
import warnings
from pathlib import Path

import pytest
from trajectory_samples import ANTHROPIC, EXPECTED, NATIVE, OPENAI, REACT, same_content, write_jsonl

from distillkit.data import (MAX_DEPTH, MAX_LINE_BYTES, TrajectoryError, UnknownKeyWarning, load_trajectories,
                             parse_trajectory)
from distillkit.data import limits
from distillkit.data.known_keys import OPENAI_CALL_KEYS, OPENAI_MESSAGE_KEYS, STEP_KEYS, TOOL_CALL_KEYS, TOP_KEYS

CORPUS = Path(__file__).parent / "malformed"
INT_DIGIT_LIMIT = getattr(sys, "get_int_max_str_digits", lambda: 0)()
needs_int_limit = pytest.mark.skipif(not INT_DIGIT_LIMIT, reason="this Python has no int-string digit limit")

# file, bad line, field, fragment of the reason, load_trajectories options
CASES = [
    ("deep_nesting", 2, "(record)", "nested deeper than 100 levels of arrays/objects", {}),
    ("deep_nesting_in_arguments", 3, "messages[1].tool_calls[0].function.arguments", "nested deeper than 100", {}),
    pytest.param("big_integer", 3, "(record)", "more than 4300 digits, Python's int-string limit", {},
                 marks=needs_int_limit),
    pytest.param("big_integer_in_arguments", 1, "messages[1].tool_calls[0].function.arguments",
                 "Python's int-string limit", {}, marks=needs_int_limit),
    ("invalid_utf8", 2, "(record)", "not valid UTF-8 (invalid continuation byte at byte 14)", {}),
    ("encoded_surrogate", 2, "(record)", "not valid UTF-8", {}),
    ("lone_surrogate_value", 3, "steps[0].tool_result", "lone surrogate (U+D800) at character 4", {}),
    ("lone_surrogate_key", 2, "steps[0]", "has a key 'x\\udc00' holding a lone surrogate (U+DC00)", {}),
    ("lone_surrogate_in_arguments", 2, "messages[1].tool_calls[0].function.arguments",
     "lone surrogate (U+DFFF) at character 1, which cannot be encoded as UTF-8 (in the decoded JSON, at city)", {}),
    ("not_an_object", 2, "(record)", "must be a JSON object, got list", {}),
    ("not_json", 3, "(record)", "not valid JSON (Expecting value at character 25)", {}),
    ("schema_error", 2, "steps[0].tool_call.name", "must be a string, got int", {}),
    ("unknown_step_key", 3, "steps[0].tool_calls", "unknown key 'tool_calls'; known in steps[*]: reasoning", {}),
    ("unknown_top_key", 2, "stepz",
     "unknown key 'stepz'; known at the top level: id, system, user, tools, steps, answer, error, stop_reason", {"unknown_keys": "error"}),
    ("unknown_block_key", 2, "messages[1].content[0].inputs", "unknown key 'inputs'; known in messages[*].content[*]",
     {"unknown_keys": "error"}),
    ("long_line", 2, "(record)", "longer than max_line_bytes=2048 bytes", {"max_line_bytes": 2048}),
    ("blank_lines_around", 4, "user", "must be a string, got int", {}),
]


def _case_name(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def _record_lines(path: Path) -> int:
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip(b" \t\r"))


def test_every_corpus_file_has_a_case():
    assert sorted(p.stem for p in CORPUS.glob("*.jsonl")) == sorted(_case_name(case) for case in CASES)


@pytest.mark.parametrize("name,line,field,fragment,options", CASES)
def test_raise_names_file_line_and_field(name, line, field, fragment, options):
    path = CORPUS / f"{name}.jsonl"
    with pytest.raises(TrajectoryError) as info:
        load_trajectories(path, **options)
    error = info.value
    assert (error.path, error.line, error.field) == (str(path), line, field)
    assert fragment in error.reason
    assert str(error) == f"{path}, line {line}, field {field!r}: {error.reason}"
    str(error).encode("utf-8")  # printable, even when the reason is about a lone surrogate


@pytest.mark.parametrize("name,line,field,fragment,options", CASES)
def test_skip_leaves_out_exactly_the_bad_line(name, line, field, fragment, options, caplog):
    path = CORPUS / f"{name}.jsonl"
    loaded = load_trajectories(path, errors="skip", **options)
    assert loaded.skipped == 1 and [(e.line, e.field) for e in loaded.errors] == [(line, field)]
    assert fragment in loaded.errors[0].reason and loaded.errors[0].path == str(path)
    assert len(loaded) == loaded.report.loaded == _record_lines(path) - 1
    assert all(same_content(t, EXPECTED) for t in loaded)
    assert f"skipped 1 malformed line(s) of {len(loaded) + 1} records" in caplog.text


def test_a_line_nested_100000_deep_never_reaches_json_loads(tmp_path, monkeypatch):
    calls = []
    real_loads = limits.json.loads
    monkeypatch.setattr(limits.json, "loads", lambda text: calls.append(len(text)) or real_loads(text))
    path = write_jsonl(tmp_path / "deep.jsonl", [NATIVE, "[" * 100_000 + "]" * 100_000, OPENAI])
    with pytest.raises(TrajectoryError, match=r"line 2, field '\(record\)': nested deeper than 100"):
        load_trajectories(path)
    loaded = load_trajectories(path, errors="skip")
    assert len(loaded) == 2 and loaded.skipped == 1
    assert max(calls) < 10_000  # only the valid lines were decoded


def test_depth_limit_is_exactly_max_depth(tmp_path):
    def record(lists: int) -> dict:  # the record (1), "tools" (2), tools[0] (3), then `lists` nested lists
        value: list = []
        for _ in range(lists - 1):
            value = [value]
        return {"user": "q", "tools": [{"p": value}]}

    assert MAX_DEPTH == 100
    path = write_jsonl(tmp_path / "t.jsonl", [record(MAX_DEPTH - 3), record(MAX_DEPTH - 2)])
    loaded = load_trajectories(path, errors="skip")
    assert len(loaded) == 1 and [(e.line, e.field) for e in loaded.errors] == [(2, "(record)")]
    parse_trajectory(record(MAX_DEPTH - 3))
    with pytest.raises(TrajectoryError, match="nested deeper than 100") as info:  # in memory: the field too
        parse_trajectory(record(MAX_DEPTH - 2))
    assert info.value.field == "tools[0].p" + "[0]" * (MAX_DEPTH - 3)


def test_line_size_limit_counts_bytes_before_the_newline(tmp_path):
    line = json.dumps({"user": "é" * 10})  # 2 bytes per é: the limit is in bytes
    size = len(line.encode())
    path = tmp_path / "t.jsonl"
    path.write_bytes((line + "\n" + line).encode())  # the last line has no newline
    assert len(load_trajectories(path, max_line_bytes=size)) == 2
    loaded = load_trajectories(path, errors="skip", max_line_bytes=size - 1)
    assert len(loaded) == 0 and [e.line for e in loaded.errors] == [1, 2]
    assert MAX_LINE_BYTES == 16 * 1024 * 1024


def test_byte_order_mark_at_the_start_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(NATIVE).encode() + b"\n" + json.dumps(REACT).encode() + b"\n")
    assert [t.source_format for t in load_trajectories(path)] == ["native", "react"]


def test_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_trajectories(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("options,words", [({"errors": "ignore"}, "errors"), ({"format": "csv"}, "format"),
                                           ({"unknown_keys": "ignore"}, "unknown_keys"),
                                           ({"max_line_bytes": 0}, "max_line_bytes")])
def test_bad_options_are_value_errors(tmp_path, options, words):
    path = write_jsonl(tmp_path / "t.jsonl", [NATIVE])
    with pytest.raises(ValueError, match=words) as info:
        load_trajectories(path, **options)
    assert not isinstance(info.value, TrajectoryError)


# ----------------------------------------------------------------------------- unknown keys

def test_unknown_keys_warn_once_per_key_per_file(tmp_path):
    stepz = {"user": "q", "stepz": [{"reasoning": "r"}], "answer": "a"}
    extra = {"messages": [{"role": "user", "content": "q", "foo": 1}, {"role": "assistant", "content": "a", "foo": 2}]}
    path = write_jsonl(tmp_path / "data.jsonl", [stepz, extra, stepz, NATIVE, stepz])
    with pytest.warns(UnknownKeyWarning) as caught:
        loaded = load_trajectories(path)
    assert len(loaded) == 5 and loaded.skipped == 0
    assert len(loaded[0].steps) == 0  # the typo is reported, not repaired
    assert sorted(str(w.message) for w in caught) == [
        f"{path}: unknown key 'foo' in messages[*] on 1 line (first line 2); known: role, content, name, "
        "tool_calls, tool_call_id, refusal, annotations, audio, function_call, reasoning_content, reasoning, weight",
        f"{path}: unknown key 'stepz' at the top level on 3 lines (first line 1); known: id, system, user, tools, "
        "steps, answer, error, stop_reason"]
    assert loaded.report.unknown_keys == {"stepz": 3, "messages[*].foo": 1}


def test_unknown_keys_error_skips_those_lines(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [NATIVE, {**REACT, "metadata": {}}, OPENAI])
    loaded = load_trajectories(path, errors="skip", unknown_keys="error")
    assert len(loaded) == 2 and [(e.line, e.field) for e in loaded.errors] == [(2, "metadata")]
    assert loaded.report.unknown_keys == {}


def test_real_export_keys_are_known(tmp_path):
    openai = {"id": "x", "parallel_tool_calls": False, "messages": [
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None, "tool_calls": [
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "r"},
        {"role": "assistant", "content": "a", "weight": 1}]}
    anthropic = {"system": "s", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]},
        {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "tool_use",
         "stop_sequence": None, "usage": {}, "content": [
             {"type": "thinking", "thinking": "t", "signature": "sig"},
             {"type": "redacted_thinking", "data": "xyz"},
             {"type": "tool_use", "id": "t1", "name": "f", "input": {}, "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r", "is_error": False}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a", "citations": []}]}]}
    path = write_jsonl(tmp_path / "t.jsonl", [openai, anthropic, NATIVE, REACT, OPENAI, ANTHROPIC])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_trajectories(path, unknown_keys="error")
    assert [t.source_format for t in loaded] == ["openai", "anthropic", "native", "react", "openai", "anthropic"]
    assert loaded.report.unknown_keys == {}


def test_parse_trajectory_takes_the_unknown_keys_option():
    record = {"user": "q", "stepz": [], "answer": "a"}
    with pytest.warns(UnknownKeyWarning, match=r"^line 4: unknown key 'stepz' at the top level; known: id, "):
        parse_trajectory(record, line=4)
    with pytest.raises(TrajectoryError) as info:
        parse_trajectory(record, unknown_keys="error")
    assert (info.value.field, info.value.line) == ("stepz", None)
    with pytest.raises(ValueError, match="unknown_keys"):
        parse_trajectory(record, unknown_keys="strict")


# ----------------------------------------------------------------------------- the error itself

def test_trajectory_error_keeps_its_location():
    error = TrajectoryError("is required", field="user", line=3)
    assert isinstance(error, ValueError) and str(error) == "line 3, field 'user': is required"
    located = error.located(path="data.jsonl")
    assert (located.path, located.line, located.field, located.reason) == ("data.jsonl", 3, "user", "is required")
    assert str(located) == "data.jsonl, line 3, field 'user': is required"
    assert str(located.at_line(9)) == "data.jsonl, line 9, field 'user': is required"
    odd = TrajectoryError("bad", path="caf\udce9.jsonl", line=1)  # an undecodable file name (surrogate escape)
    assert str(odd) == "caf\\udce9.jsonl, line 1: bad"
    assert str(TrajectoryError("bad", trajectory="'t1' (index 2)", field="user")) == \
        "trajectory 't1' (index 2), field 'user': bad"


def test_docs_state_the_limits_and_the_known_keys():
    docs = (Path(__file__).parents[2] / "docs" / "DATA.md").read_text()
    errors = docs[docs.index("## Errors"):docs.index("## Rendering")]
    assert f"`MAX_DEPTH` = {MAX_DEPTH}" in errors and MAX_LINE_BYTES == 16 * 2**20 and "= 16 MiB" in errors
    for known in [*TOP_KEYS.values(), STEP_KEYS, TOOL_CALL_KEYS, OPENAI_MESSAGE_KEYS, OPENAI_CALL_KEYS]:
        assert ", ".join(f"`{key}`" for key in known) in errors, known
