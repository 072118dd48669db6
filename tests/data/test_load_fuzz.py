"""Fuzz tests of load_trajectories (hypothesis): (a) for any file content, nothing but TrajectoryError
escapes, and the lines add up (loaded + skipped + blank = all lines); (b) errors="skip" never drops a
valid line: generated valid records interleaved with garbage lines load back in order, and exactly
the garbage lines are skipped.
"""

import json
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trajectory_samples import ANTHROPIC, NATIVE, OPENAI, REACT

from distillkit.data import TrajectoryError, UnknownKeyWarning, load_trajectories, parse_trajectory

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT_DIGIT_LIMIT = getattr(sys, "get_int_max_str_digits", lambda: 0)()

# Text that sometimes holds surrogates (hypothesis leaves them out unless asked).
texts = st.text(st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12)


def nested_list(depth: int) -> list:
    """A list nested `depth` deep, built in memory (a file could not hold it past the depth check)."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _paths(value):
    """Every (container, key) inside a JSON value, for mutations."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in list(items):
        yield value, key
        yield from _paths(child)


@st.composite
def mutated_records(draw):
    record = json.loads(json.dumps(draw(st.sampled_from([NATIVE, OPENAI, ANTHROPIC, REACT]))))  # a deep copy
    for _ in range(draw(st.integers(1, 4))):
        container, key = draw(st.sampled_from(list(_paths(record))))
        action = draw(st.sampled_from(["replace", "delete", "add key", "wrap"]))
        if action == "replace":
            container[key] = draw(json_values)
        elif action == "delete":
            del container[key]
            if not list(_paths(record)):
                break
        elif action == "add key" and isinstance(container[key], dict):
            container[key][draw(texts)] = draw(json_values)
        else:
            container[key] = [container[key]]
    return record


def _dumps(value, ascii_only: bool) -> bytes:
    # Without ensure_ascii a lone surrogate is written raw: encoded with surrogatepass, it is invalid UTF-8.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


deep_lines = st.builds(lambda n, m, o: (o * n + "]" * m).encode(), st.integers(90, 5000), st.integers(0, 5000),
                       st.sampled_from(["[", '{"a":[', '{"user":"q","tools":[']))
big_int_lines = st.builds(lambda n, where: where.format("9" * n).encode(), st.integers(4000, 6000),
                          st.sampled_from(['{{"user": "q", "id": {}}}', "[{}]", '{{"messages": [{{"role": "user", '
                                           '"content": "q"}}, {{"role": "assistant", "tool_calls": [{{"function": '
                                           '{{"name": "f", "arguments": "{{\\"n\\": {}}}"}}}}]}}]}}']))
any_line = st.one_of(
    st.binary(max_size=60),
    st.builds(_dumps, json_values, st.booleans()),
    st.builds(_dumps, mutated_records(), st.booleans()),
    deep_lines, big_int_lines,
    st.builds(lambda t: json.dumps({"user": t, "steps": [], "answer": t}).encode(), texts))


def _count_lines(content: bytes, max_line_bytes: int) -> tuple[int, int]:
    """(lines, blank lines) as the loader counts them: split on \\n, blank = spaces, tabs and CRs only
    (after a byte order mark on the first line), and not over the size limit, which is checked first."""
    lines = content.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    blank = sum(1 for n, line in enumerate(lines) if len(line) <= max_line_bytes
                and not (line[3:] if n == 0 and line.startswith(b"\xef\xbb\xbf") else line).strip(b" \t\r"))
    return len(lines), blank


@FUZZ
@given(lines=st.lists(any_line, max_size=6), errors=st.sampled_from(["raise", "skip"]),
       unknown_keys=st.sampled_from(["warn", "error"]), max_line_bytes=st.sampled_from([64, 4096, 1 << 24]))
def test_only_trajectory_errors_escape(tmp_path_factory, lines, errors, unknown_keys, max_line_bytes):
    path = tmp_path_factory.mktemp("fuzz") / "t.jsonl"
    content = b"\n".join(lines)
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownKeyWarning)
        try:
            loaded = load_trajectories(path, errors=errors, unknown_keys=unknown_keys, max_line_bytes=max_line_bytes)
        except TrajectoryError as exc:
            assert errors == "raise" and exc.line is not None and exc.path == str(path) and exc.field
            str(exc).encode("utf-8")
            return
    total, blank = _count_lines(content, max_line_bytes)
    assert loaded.report.loaded + loaded.skipped + blank == total
    assert all(isinstance(e, TrajectoryError) and e.line for e in loaded.errors)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # in memory: fast
@given(record=st.one_of(mutated_records(), json_values,
                        st.integers(150, 3000).map(lambda n: {"user": "q", "tools": [nested_list(n)]})),
       unknown_keys=st.sampled_from(["warn", "error"]))
def test_parse_trajectory_raises_only_trajectory_errors(record, unknown_keys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownKeyWarning)
        try:
            parse_trajectory(record, unknown_keys=unknown_keys)
        except TrajectoryError as exc:
            str(exc).encode("utf-8")


# ----------------------------------------------------------------------------- (b) skip keeps every valid line

MAX_LINE = 8192
short = st.text(max_size=16)  # no surrogates: these are the valid records
arguments = st.dictionaries(st.text(max_size=6), st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                                                            st.floats(allow_nan=False, allow_infinity=False), short),
                            max_size=3)


@st.composite
def valid_records(draw):
    """A native record in the form Trajectory.to_dict() writes, so that loading must give it back."""
    record = {}
    if draw(st.booleans()):
        record["id"] = draw(short)
    if draw(st.booleans()):
        record["system"] = draw(short)
    record["user"] = draw(short)
    steps = []
    for _ in range(draw(st.integers(0, 3))):
        step = {}
        if draw(st.booleans()):
            step["reasoning"] = draw(short)
        if "reasoning" not in step or draw(st.booleans()):
            step["tool_call"] = {"name": draw(short), "arguments": draw(arguments)}
            if draw(st.booleans()):
                step["tool_result"] = draw(short)
        steps.append(step)
    record["steps"] = steps
    if draw(st.booleans()):
        record["answer"] = draw(short)
    return record


def _broken(record: dict, how: str) -> bytes:
    """A line that is certainly malformed, made from a valid record."""
    text = json.dumps(record)
    if how == "truncated":
        return text[:-1].encode()
    if how == "bad utf-8":
        return b"\xff" + text.encode()
    if how == "surrogate":
        return json.dumps({**record, "user": record["user"] + "\ud800"}).encode()  # written as a \\ud800 escape
    if how == "unknown key":
        return json.dumps({**record, "stepz": []}).encode()
    if how == "wrong type":
        return json.dumps({**record, "user": len(record["user"])}).encode()
    if how == "not an object":
        return json.dumps([record]).encode()
    if how == "too deep":
        return json.dumps({**record, "tools": [{"p": nested_list(120)}]}).encode()
    if how == "too long":
        return json.dumps({**record, "system": "x" * MAX_LINE}).encode()
    return ('{"id": ' + "1" * (INT_DIGIT_LIMIT + 1) + ', "user": "q"}').encode()  # "big int"


garbage_kinds = ["truncated", "bad utf-8", "surrogate", "unknown key", "wrong type", "not an object", "too deep",
                 "too long"] + (["big int"] if INT_DIGIT_LIMIT else [])
lines_in_order = st.lists(st.one_of(
    valid_records().map(lambda r: ("valid", r)),
    st.tuples(valid_records(), st.sampled_from(garbage_kinds)).map(lambda rk: ("garbage", _broken(*rk))),
    st.sampled_from([b"", b"  ", b"\t\r"]).map(lambda b: ("blank", b))), max_size=12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=lines_in_order, ascii_only=st.booleans())
def test_skip_never_drops_a_valid_line(tmp_path_factory, items, ascii_only):
    path = tmp_path_factory.mktemp("fuzz") / "t.jsonl"
    encoded = [_dumps(value, ascii_only) if kind == "valid" else value for kind, value in items]
    assert all(len(line) <= MAX_LINE for (kind, _), line in zip(items, encoded) if kind == "valid")
    path.write_bytes(b"\n".join(encoded) + b"\n")
    loaded = load_trajectories(path, errors="skip", unknown_keys="error", max_line_bytes=MAX_LINE)
    assert [t.to_dict() for t in loaded] == [value for kind, value in items if kind == "valid"]
    assert loaded.skipped == sum(kind == "garbage" for kind, _ in items)
    assert [e.line for e in loaded.errors] == [n for n, (kind, _) in enumerate(items, start=1) if kind == "garbage"]


def test_each_garbage_kind_is_malformed(tmp_path):
    """The garbage of (b) is garbage: each kind alone is one skipped line with its own reason."""
    record = {"id": "a", "user": "q", "steps": [{"reasoning": "r"}]}
    reasons = {}
    for kind in garbage_kinds:
        path = tmp_path / f"{kind}.jsonl"
        path.write_bytes(_broken(record, kind) + b"\n")
        with pytest.raises(TrajectoryError) as info:
            load_trajectories(path, unknown_keys="error", max_line_bytes=MAX_LINE)
        reasons[kind] = info.value.reason
    assert len(set(reasons.values())) == len(garbage_kinds), reasons
