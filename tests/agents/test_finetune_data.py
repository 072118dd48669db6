"""Chat-format fine-tuning JSONL: written, validated, and read back (also through distillkit.data)."""

import importlib
import json
import random

import pytest

from distillkit.demo.env import TOOL_SPECS, gold_trajectory, make_splits
from distillkit.agents.finetune_data import (
    FinetuneDataError, build_finetune_jsonl, load_finetune_jsonl, trajectory_to_messages, validate_record,
)


def samples(n=8):
    tasks = make_splits({"x": n}, seed=5)["x"]
    rng = random.Random(0)
    return [gold_trajectory(t, rng) for t in tasks]


def test_messages_shape():
    traj = samples(4)[3]  # a 4-step task
    messages = trajectory_to_messages(traj, system="You are a tool-using agent.")
    assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "tool"] * 4 + ["assistant"]
    call = messages[2]["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == traj["steps"][0]["tool_call"]["arguments"]
    assert messages[3] == {"role": "tool", "tool_call_id": call["id"], "content": traj["steps"][0]["tool_result"]}
    assert messages[2]["content"] == traj["steps"][0]["reasoning"]
    assert messages[-1] == {"role": "assistant", "content": traj["answer"]}


def test_round_trip(tmp_path):
    data = samples()
    failed = {"user": "q", "steps": [], "answer": None, "error": "RateLimitError (HTTP 429)"}
    path = tmp_path / "sft.jsonl"
    written = build_finetune_jsonl(data + [failed], path, tools=TOOL_SPECS)
    assert written == len(data)  # the failed trajectory is left out
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(data)
    for record in records:
        validate_record(record)
        assert record["tools"][0] == {"type": "function", "function": {
            "name": "calc", "description": TOOL_SPECS[0]["description"], "parameters": TOOL_SPECS[0]["input_schema"]}}
    assert load_finetune_jsonl(path) == data
    with pytest.raises(FinetuneDataError, match="failed"):
        build_finetune_jsonl([failed], tmp_path / "x.jsonl", skip_failed=False)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["messages"].pop(0), "first message"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{not json"), "JSON string"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="[1]"), "JSON object"),
    (lambda r: r["messages"].pop(2), "not answered"),
    (lambda r: r["messages"][2].update(tool_call_id="call_9"), "no open tool call"),
    (lambda r: r["messages"].pop(), "final answer"),
    (lambda r: r["messages"][0].update(role="robot"), "first message|unknown role"),
    (lambda r: r["messages"].append({"role": "system", "content": "late"}), "system message"),
])
def test_validation_rejects(mutate, message):
    record = {"messages": trajectory_to_messages(samples(2)[1])}
    validate_record(record)
    mutate(record)
    with pytest.raises(FinetuneDataError, match=message):
        validate_record(record)


def test_invalid_sample_does_not_write(tmp_path):
    path = tmp_path / "bad.jsonl"
    bad = {"user": "q", "steps": [{"reasoning": "r", "tool_call": None, "tool_result": "1"}], "answer": "1"}
    with pytest.raises(FinetuneDataError, match="sample 1"):
        build_finetune_jsonl(samples(1) + [bad], path)
    assert not path.exists()


def test_loads_through_the_data_layer(tmp_path):
    try:
        data_layer = importlib.import_module("distillkit.data")
    except ImportError:
        pytest.skip("distillkit.data is not available")
    load = getattr(data_layer, "load_trajectories", None)
    if load is None:
        pytest.skip("distillkit.data has no load_trajectories")
    data = samples()
    path = tmp_path / "sft.jsonl"
    build_finetune_jsonl(data, path, tools=TOOL_SPECS)
    data.append({"user": "q", "steps": [{"reasoning": "think first"},
                                        {"reasoning": "r", "tool_call": {"name": "calc", "arguments": {"expr": "1"}},
                                         "tool_result": "1"}], "answer": "1"})
    build_finetune_jsonl(data, path, tools=TOOL_SPECS)
    assert load_finetune_jsonl(path) == data
    loaded = load(str(path))
    assert len(loaded) == len(data)
    for want, got in zip(data, loaded):
        assert got.user == want["user"] and got.answer == want["answer"]
        assert len(got.steps) == len(want["steps"])
        for w, g in zip(want["steps"], got.steps):
            assert g.reasoning == w["reasoning"]
            if "tool_call" in w:
                assert (g.tool_call.name, g.tool_call.arguments) == (w["tool_call"]["name"], w["tool_call"]["arguments"])
                assert g.tool_result == w["tool_result"]
            else:
                assert g.tool_call is None
