"""The demo's synthetic tool-use environment: tools, the safe calculator, tasks and the checker."""

import random
from fractions import Fraction

import pytest

from distillkit.agents.agent import execute_tool
from distillkit.demo.env import (
    KeyValueStore, TaskGenerator, ToolError, check_answer, convert_units, format_number, gold_trajectory,
    make_splits, make_tools, parse_number, safe_calc,
)


@pytest.mark.parametrize("expr, value", [
    ("2+3*4", 14), ("(2+3)*4", 20), ("-3+5", 2), ("7/2", Fraction(7, 2)), ("1.5*2", 3), ("+4--2", 6),
    ("7*110+3*350", 1820), ("10/4/5", Fraction(1, 2)), (" 12 - 30 ", -18),
])
def test_calculator_arithmetic(expr, value):
    assert safe_calc(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')", "open('/etc/passwd').read()", "x + 1", "2**100", "9**9**9",
    "[1, 2]", "'a' * 3", "lambda: 1", "1 if 1 else 2", "True + 1", "(1).__class__", "1 < 2", "1 % 2",
    "1 // 2", "", "   ", "1/0", "1e400*1e400", "-" * 100 + "1", "1" * 300, "print(1)", "1; 2", "a = 1",
    "10**15", "9999999999*9999999999", "b'1'", "1j", "{1: 2}", "f'{1}'",
])
def test_calculator_rejects_code_and_bad_input(expr):
    with pytest.raises(ToolError):
        safe_calc(expr)


def test_calculator_never_calls_eval(monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must not be used")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert safe_calc("6*7") == 42


def test_format_number():
    assert format_number(Fraction(1820)) == "1820"
    assert format_number(Fraction(182, 100)) == "1.82"
    assert format_number(Fraction(1, 3)) == "0.3333"
    assert format_number(-2.5) == "-2.5"
    assert parse_number("F: about -1.82 kg") == Fraction("-1.82")
    assert parse_number("no number") is None


def test_unit_converter():
    assert convert_units(3, "km", "m") == 3000
    assert convert_units(1820, "g", "kg") == Fraction(182, 100)
    assert convert_units(2, "h", "min") == 120
    assert convert_units(17, "usd", "cents") == 1700
    with pytest.raises(ToolError, match="cannot convert"):
        convert_units(1, "km", "kg")
    with pytest.raises(ToolError, match="unknown unit"):
        convert_units(1, "furlong", "m")
    with pytest.raises(ToolError):
        convert_units(True, "m", "cm")
    with pytest.raises(ToolError):
        convert_units("abc", "m", "cm")


def test_tools_and_errors_as_observations():
    store = KeyValueStore(0)
    tools = make_tools(store)
    assert tools["calc"](expr="3*6") == "18"
    assert tools["convert"](**{"value": 7, "from": "km", "to": "m"}) == "7000"
    assert tools["lookup"](key="kiwi.price") == str(store.data["kiwi.price"])
    assert execute_tool(tools, {"name": "lookup", "arguments": {"key": "unobtainium.price"}}).startswith("error:")
    assert execute_tool(tools, {"name": "calc", "arguments": {"expr": "__import__('os')"}}).startswith("error:")
    assert execute_tool(tools, {"name": "calc", "arguments": {"wrong": "1"}}).startswith("error:")
    assert execute_tool(tools, {"name": "rm", "arguments": {}}).startswith("error: unknown tool")
    assert KeyValueStore(0).data == store.data and KeyValueStore(1).data != store.data


def test_task_generation_graded_and_consistent():
    gen = TaskGenerator(KeyValueStore(0))
    rng = random.Random(1)
    for steps in (1, 2, 3, 4):
        for _ in range(30):
            task = gen.sample(rng, steps)
            assert task.num_steps == steps == len(task.plan) == len(task.results)
            replay = [gen.tools[c["name"]](**c["arguments"]) for c in task.plan]
            assert replay == task.results and task.answer == task.results[-1]
            assert check_answer(task, task.answer)
            assert check_answer(task, f"The answer is {task.answer} units.")
            assert not check_answer(task, str(Fraction(task.answer) + 1))
            assert not check_answer(task, None) and not check_answer(task, "I don't know")
            traj = gold_trajectory(task, rng)
            assert [s["tool_call"] for s in traj["steps"]] == task.plan and traj["answer"] == task.answer


def test_splits_are_disjoint_balanced_and_deterministic():
    splits = make_splits({"train": 200, "val": 40, "test": 80}, seed=3)
    questions = [set(t.question for t in ts) for ts in splits.values()]
    assert all(len(q) == n for q, n in zip(questions, (200, 40, 80)))
    assert not (questions[0] & questions[1]) and not (questions[0] & questions[2]) and not (questions[1] & questions[2])
    for tasks in splits.values():
        counts = [sum(t.num_steps == k for t in tasks) for k in (1, 2, 3, 4)]
        assert max(counts) - min(counts) <= 1
    again = make_splits({"train": 200, "val": 40, "test": 80}, seed=3)
    assert [t.question for t in again["test"]] == [t.question for t in splits["test"]]


def test_training_splits_may_repeat_but_never_see_evaluation_questions():
    splits = make_splits({"test": 60, "val": 20, "student": 300, "teacher": 900}, seed=0,
                         repeats=("student", "teacher"))
    held_out = {t.question for t in splits["test"]} | {t.question for t in splits["val"]}
    assert len(held_out) == 80
    training = [t.question for t in splits["student"] + splits["teacher"]]
    assert not held_out & set(training)
    assert len(set(training)) < len(training)  # the 48 lookups recur in the training splits
    for name in ("test", "val", "student", "teacher"):  # every template stays represented
        assert {t.kind for t in splits[name]} >= {"lookup", "calc", "convert", "cost", "cost_two_cents"}
