"""load_tokenized: JSONL of already tokenized examples ({input_ids, labels[, span_ids, attention_mask, id]}),
every malformed line a TrajectoryError naming file, line and field; skip mode drops exactly those lines."""

from __future__ import annotations

import json
import warnings

import pytest

from distillkit.data import TrajectoryError, UnknownKeyWarning, load_tokenized

GOOD = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}


@pytest.mark.parametrize("line, field, fragment", [
    ('{"input_ids": [1, 2]}', "labels", "is required"),
    ('{"labels": [1, 2]}', "input_ids", "is required"),
    ('{"input_ids": [], "labels": []}', "input_ids", "must not be empty"),
    ('{"input_ids": [1, 2], "labels": [1]}', "labels", "has 1 items but input_ids has 2"),
    ('{"input_ids": [1, 2], "labels": [1, 99]}', "labels[1]", "must be in [0, 10) or -100, got 99"),
    ('{"input_ids": [1, 10], "labels": [1, 1]}', "input_ids[1]", "must be in [0, 10), got 10"),
    ('{"input_ids": [1, true], "labels": [1, 1]}', "input_ids[1]", "must be an integer, got bool"),
    ('{"input_ids": [1, 2.0], "labels": [1, 1]}', "input_ids[1]", "must be an integer, got float"),
    ('{"input_ids": "12", "labels": [1, 1]}', "input_ids", "must be a list of integers"),
    ('{"input_ids": [1, 2], "labels": [1, 1], "span_ids": [0, 5]}', "span_ids[1]", "must be in [0, 5) or -1"),
    ('{"input_ids": [1, 2], "labels": [1, 1], "attention_mask": [1, 2]}', "attention_mask[1]", "[0, 2)"),
    ('[1, 2]', "(record)", "must be a JSON object"),
    ('{"input_ids": [1, 2], "labels": [1, 1', "(record)", "not valid JSON"),
    ('{"input_ids": [1, 2], "labels": [1, 1], "id": "\\ud800"}', "id", "lone surrogate"),
    ('{"input_ids": [' + "1" * 5000 + '], "labels": [1]}', "(record)", "Python's int-string limit"),
    ("[" * 200 + "]" * 200, "(record)", "nested deeper"),
])
def test_malformed_lines_are_located_and_skipped_alone(tmp_path, line, field, fragment):
    path = tmp_path / "tok.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(TrajectoryError) as info:
        load_tokenized(path, vocab_size=10)
    error = info.value
    assert (error.path, error.line, error.field) == (str(path), 2, field), str(error)
    assert fragment in error.reason and str(error).startswith(f"{path}, line 2, field {field!r}: ")
    loaded = load_tokenized(path, "skip", vocab_size=10)
    assert loaded == [GOOD, GOOD] and loaded.report.skipped == 1 and loaded.report.errors[0].line == 2


def test_optional_fields_and_unknown_keys(tmp_path):
    path = tmp_path / "tok.jsonl"
    full = dict(GOOD, span_ids=[-1, 4, 4], attention_mask=[1, 1, 1], id="a")
    path.write_text(json.dumps(full) + "\n\n" + json.dumps(dict(GOOD, stepz=1)) + "\n")
    with pytest.warns(UnknownKeyWarning, match=r"unknown key 'stepz' on 1 line\(s\) \(first line 3\)"):
        loaded = load_tokenized(path)
    assert loaded[0] == {k: full[k] for k in ("input_ids", "labels", "span_ids", "attention_mask")}
    assert loaded[1] == GOOD and loaded.report.unknown_keys == {"stepz": 1}
    with pytest.raises(TrajectoryError, match="line 3, field 'stepz': unknown key"):
        load_tokenized(path, unknown_keys="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_tokenized(path, "skip", unknown_keys="error")) == 1


def test_line_size_limit_and_bad_options(tmp_path):
    path = tmp_path / "tok.jsonl"
    path.write_text(json.dumps({"input_ids": list(range(100)), "labels": list(range(100))}) + "\n"
                    + json.dumps(GOOD) + "\n")
    loaded = load_tokenized(path, "skip", max_line_bytes=200)
    assert loaded == [GOOD] and "max_line_bytes=200" in loaded.report.errors[0].reason
    with pytest.raises(ValueError, match="errors must be"):
        load_tokenized(path, "ignore")
    with pytest.raises(ValueError, match="unknown_keys must be"):
        load_tokenized(path, unknown_keys="quiet")
