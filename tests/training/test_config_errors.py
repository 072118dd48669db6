"""Config errors of DistillationConfig, CurriculumConfig and `distillkit train`: every value is checked
against its field's type (YAML `1e-3` -> 0.001, a quoted 'false' is an error), every error names the
dotted key and exits 2 without a traceback, and --dry-run runs every check a real run does."""

from __future__ import annotations

import json
from typing import Optional, Union

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")
yaml = pytest.importorskip("yaml")

from distillkit.training import cli as train_cli  # noqa: E402
from distillkit.training.coerce import ConfigError, coerce_value  # noqa: E402
from distillkit.training.curriculum import CurriculumConfig  # noqa: E402
from distillkit.training.trainer import DistillationConfig  # noqa: E402

from trainer_helpers import ROOT, make_tiny  # noqa: E402

TINY_YAML = ROOT / "examples" / "train_tiny.yaml"


# ----------------------------------------------------------------------------- value coercion


@pytest.mark.parametrize("value, annotation, expected", [
    ("1e-3", float, 1e-3), (3, float, 3.0), ("-2.5E+1", float, -25.0), ("128", int, 128), (128.0, int, 128),
    (True, bool, True), (None, Optional[int], None), ("auto", Union[str, bool], "auto"),
    (False, Union[str, bool], False), ("12", Optional[int], 12), ([1, 2], list, [1, 2]),
])
def test_coerce_accepts(value, annotation, expected):
    out = coerce_value(value, annotation, "k")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value, annotation, reason", [
    ("false", bool, "must be true or false; got str 'false' (write true or false without quotes)"),
    ("yes", bool, "must be true or false"), (0, bool, "must be true or false; got int 0"),
    ("one", int, "must be an integer; got str 'one'"), (1.5, int, "must be an integer"),
    (True, int, "must be an integer; got bool True"), ("x", float, "must be a number; got str 'x'"),
    (False, float, "must be a number"), (3, str, "must be a string; got int 3"),
    (None, float, "must be set; got null"), ("a", dict, "must be a mapping"),
])
def test_coerce_rejects_with_the_key(value, annotation, reason):
    with pytest.raises(ConfigError) as info:
        coerce_value(value, annotation, "loss.x")
    assert info.value.key == "loss.x" and reason in info.value.reason
    assert str(info.value).startswith("loss.x: ")


# ----------------------------------------------------------------------------- DistillationConfig


def test_distillation_config_coerces_loose_yaml_values():
    config = DistillationConfig.from_dict({"temperature": "2", "beta": "1e-1", "ignore_index": "-1",
                                           "span_weights": {"reason": ["1e-3", 0], "2": [0, 1]},
                                           "alpha_beta": ["0.5", 1], "use_logits_free": "false",
                                           "curriculum": {"ramp": "0.1", "max_complexity": 4}})
    assert config.temperature == 2.0 and config.beta == 0.1 and config.ignore_index == -1
    assert config.span_weights == {"reason": (1e-3, 0.0), 2: (0.0, 1.0)}  # "2": a span id from JSON
    assert config.alpha_beta == (0.5, 1.0) and config.use_logits_free is False
    assert config.curriculum.ramp == 0.1 and config.curriculum.max_complexity == 4.0


@pytest.mark.parametrize("options, key, fragment", [
    ({"temprature": 2.0}, "temprature", "did you mean 'temperature'"),
    ({"divergence": "kl"}, "divergence", "got 'kl'"),
    ({"beta": 2.0}, "beta", "must be in (0, 1)"),
    ({"beta": "half"}, "beta", "must be a number"),
    ({"skew": True}, "skew", "must be a number"),
    ({"temperature": 0}, "temperature", "> 0"),
    ({"temperature_scaling": "false"}, "temperature_scaling", "must be true or false"),
    ({"learnable_span_weights": "false"}, "learnable_span_weights", "must be true or false"),
    ({"check_labels": "no"}, "check_labels", "must be true or false"),
    ({"ignore_index": "x"}, "ignore_index", "must be an integer"),
    ({"alpha_beta": [0, 0]}, "alpha_beta", "not both 0"),
    ({"alpha_beta": 1}, "alpha_beta", "must be a list"),
    ({"span_weights": {"reasn": [1, 0]}}, "span_weights.reasn", "unknown span"),
    ({"span_weights": {"reason": [1]}}, "span_weights.reason", "pair"),
    ({"span_weights": {"reason": ["a", 0]}}, "span_weights.reason[0]", "must be a number"),
    ({"use_logits_free": "sometimes"}, "use_logits_free", "'auto', true or false"),
    ({"chunk_size": "0"}, "chunk_size", ">= 1"),
    ({"backend": "fast"}, "backend", "fast"),
    ({"vocab_mismatch": "pad"}, "vocab_mismatch", "pad"),
    ({"log_components": "some"}, "log_components", "some"),
    ({"curriculum": {"ramp": "a"}}, "curriculum.ramp", "must be a number"),
    ({"curriculum": {"rampp": 1}}, "curriculum.rampp", "did you mean 'ramp'"),
    ({"curriculum": {"measure": "depth"}}, "curriculum.measure", "must be one of"),
    ({"curriculum": 3}, "curriculum", "must be a CurriculumConfig"),
])
def test_distillation_config_errors_name_the_field(options, key, fragment):
    with pytest.raises(ConfigError) as info:
        DistillationConfig.from_dict(options)
    assert info.value.key == key, str(info.value)
    assert fragment in info.value.reason
    assert isinstance(info.value, ValueError)  # the documented type of every config error


def test_python_keywords_are_checked_too():
    with pytest.raises(ConfigError, match="^temperature_scaling: must be true or false"):
        DistillationConfig(temperature_scaling="false")
    with pytest.raises(ConfigError, match="^warmup: must be > 0"):
        CurriculumConfig(warmup=0)


# ----------------------------------------------------------------------------- distillkit train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_cli")
    make_tiny.build_workspace(out, n_trajectories=8)
    return out


def _run(capsys, *argv):
    code = train_cli.main(["--config", str(TINY_YAML), "--dry-run", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_prints_the_checked_config(tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("TINY_DIR", str(tiny_dir))
    code, out, err = _run(capsys, "--set", "training.learning_rate=1e-3", "--set", "data.max_length='64'",
                          "--set", "training.save_strategy=no")
    assert code == 0, err
    resolved = json.loads(out)
    assert resolved["training"]["learning_rate"] == 1e-3  # YAML's string "1e-3", as a float
    assert resolved["data"]["max_length"] == 64
    assert resolved["training"]["save_strategy"] == "no"  # an unquoted YAML `no` means the string here
    assert resolved["teacher"]["path"] == str(tiny_dir / "teacher")
    assert resolved["loss"]["curriculum"]["measure"] == "steps"
    assert resolved["loss"]["temperature_scaling"] is True  # defaults filled in
    assert not (tiny_dir / "run").exists()  # nothing written


@pytest.mark.parametrize("override, key, fragment", [
    ("loss.divergence=kl", "loss.divergence", "got 'kl'"),
    ("loss.temprature=2", "loss.temprature", "did you mean 'temperature'"),
    ("loss.beta=2", "loss.beta", "(0, 1)"),
    ("loss.temperature_scaling='false'", "loss.temperature_scaling", "must be true or false"),
    ("loss.learnable_span_weights='false'", "loss.learnable_span_weights", "must be true or false"),
    ("loss.check_labels='false'", "loss.check_labels", "must be true or false"),
    ("loss.ignore_index=x", "loss.ignore_index", "must be an integer"),
    ("training.lr=1e-3", "training.lr", "unknown key; did you mean 'learning_rate'?"),
    ("training.foo_bar=1", "training.foo_bar", "unknown key: not an option of transformers.TrainingArguments"),
    ("training.learning_rate=fast", "training.learning_rate", "must be a number"),
    ("training.max_steps=one", "training.max_steps", "must be an integer"),
    ("training.lr_scheduler_type=cosine_ish", "training.lr_scheduler_type", "must be one of"),
    ("training.output_dir=x", "training.output_dir", "top level"),
    ("data.max_length=0", "data.max_length", ">= 1"),
    ("data.errors=ignore", "data.errors", "must be one of"),
    ("data.format=csv", "data.format", "must be one of"),
    ("data.trian=x.jsonl", "data.trian", "did you mean 'train'"),
    ("data.train=missing.jsonl", "data.train", "does not exist"),
    ("student.dtype=fp8", "student.dtype", "must be one of"),
    ("student.seed=abc", "student.seed", "must be an integer"),
    ("teacher.path=Qwen/Qwen2.5-0.5B", "teacher.path", "local directories only (nothing is downloaded)"),
    ("teacher.path=nowhere", "teacher.path", "does not exist"),
    ("tokenizer=student", "tokenizer", "cannot load a tokenizer"),
    ("seed=x", "seed", "must be an integer"),
    ("lossy=1", "lossy", "unknown key"),
    ("loss.curriculum.warmup=0", "loss.curriculum.warmup", "> 0"),
])
def test_every_config_error_exits_2_with_the_dotted_key(tiny_dir, monkeypatch, capsys, override, key, fragment):
    monkeypatch.setenv("TINY_DIR", str(tiny_dir))
    if override == "tokenizer=student":
        override = f"tokenizer={tiny_dir / 'trajectories.jsonl'}"  # a file, not a tokenizer directory
        fragment = "not a directory"
    code, out, err = _run(capsys, "--set", override)
    assert code == 2 and out == ""
    assert err.startswith(f"distillkit train: error: {key}: "), err
    assert fragment in err and "Traceback" not in err


def test_a_real_run_rejects_what_dry_run_rejects_before_loading_models(tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("TINY_DIR", str(tiny_dir))
    calls = []
    monkeypatch.setattr(train_cli, "build_model", lambda *a, **k: calls.append(a))
    for override in ("loss.divergence=kl", "training.lr=1e-3", "loss.unknown=1", "data.max_length=x"):
        assert train_cli.main(["--config", str(TINY_YAML), "--set", override]) == 2
        assert "error:" in capsys.readouterr().err
    assert calls == []


def test_dry_run_checks_models_data_and_resume(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINY_DIR", str(tiny_dir))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dir / "student" / "config.json").read_text())
    code, _, err = _run(capsys, "--set", f"student.path={no_weights}")
    assert code == 2 and "student.path: " in err and "no safetensors weights" in err
    code, _, err = _run(capsys, "--set", "student={config: {model_type: nonsense}}")
    assert code == 2 and "student.config: " in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "hi", "answer": "ok"}\n{"user": 3}\n')
    code, _, err = _run(capsys, "--set", f"data.train={bad}", "--set", "data.errors=raise")
    assert code == 2 and "data.train: " in err and "line 2" in err
    code, _, err = _run(capsys, "--resume")
    assert code == 2 and "--resume: no checkpoint in" in err


def test_config_file_errors(tmp_path, capsys):
    assert train_cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    assert train_cli.main(["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("- a list\n")
    assert train_cli.main(["--config", str(bad)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


def test_unset_environment_variable_names_the_key(monkeypatch, capsys):
    monkeypatch.delenv("TINY_DIR", raising=False)
    code, _, err = _run(capsys)
    assert code == 2 and "TINY_DIR" in err and "teacher.path: " in err
