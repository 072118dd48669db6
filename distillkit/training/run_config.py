"""The YAML of `distillkit train`: read, override (`--set`), expand `${VAR}`, check every key.

`load_config` checks the structure and the type of every value against the class it will fill
(coerce.py): `student`/`teacher` -> ModelSpec, `data` -> DataOptions, `training` ->
transformers.TrainingArguments, `loss` -> DistillationConfig. Each failure is a ConfigError whose
key is the dotted path (`loss.beta`, `training.learning_rate`); `distillkit train` prints it and
exits 2, before any model is loaded. Checks that need files (directories, the tokenizer, the data)
are in cli.py's `prepare`, which `--dry-run` runs too.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .coerce import ConfigError, coerce_fields, coerce_value, unknown_key_error
from .config import DistillationConfig

__all__ = ["ConfigError", "DataOptions", "ModelSpec", "TOP_LEVEL", "DTYPES", "DATA_FORMATS", "load_config",
           "check_training_options"]

TOP_LEVEL = ("student", "teacher", "tokenizer", "data", "output_dir", "training", "loss", "seed")
DTYPES = ("float32", "bfloat16", "float16", "auto")
# The trajectory formats of docs/DATA.md, and "tokenized": JSONL of {input_ids, labels[, span_ids]}.
DATA_FORMATS = ("native", "openai", "anthropic", "react", "tokenized")
# TrainingArguments options whose "off" value is the string "no" (an unquoted YAML `no` arrives as False).
OFF_AS_NO = ("eval_strategy", "save_strategy", "logging_strategy")
# Other names of TrainingArguments options (other trainers' configs, habit), for "did you mean".
TRAINING_ALIASES = {"lr": "learning_rate", "batch_size": "per_device_train_batch_size",
                    "train_batch_size": "per_device_train_batch_size", "eval_batch_size": "per_device_eval_batch_size",
                    "epochs": "num_train_epochs", "num_epochs": "num_train_epochs", "steps": "max_steps",
                    "grad_accum": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
                    "warmup": "warmup_steps", "scheduler": "lr_scheduler_type", "lr_scheduler": "lr_scheduler_type",
                    "clip_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm"}
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class ModelSpec:
    """`student:` / `teacher:`: a local model directory or a config to build from (random weights)."""

    path: Optional[str] = None
    config: Union[str, dict, None] = None
    seed: int = 0
    dtype: str = "float32"
    attn_implementation: Optional[str] = None
    cache: Optional[str] = None  # teacher only: a teacher cache directory (`distillkit cache-teacher`)


@dataclass
class DataOptions:
    """`data:`: the files and how they are tokenized (docs/TRAINER.md)."""

    train: str = ""
    eval: Optional[str] = None
    format: Optional[str] = None
    errors: str = "raise"
    unknown_keys: str = "warn"
    max_length: Optional[int] = None
    truncation: str = "drop_partial_span"
    use_chat_template: Optional[bool] = None
    pad_to_multiple_of: Optional[int] = None
    add_eos: bool = True

    def __post_init__(self):
        choices = {"format": (None,) + DATA_FORMATS, "errors": ("raise", "skip"), "unknown_keys": ("warn", "error"),
                   "truncation": ("drop_partial_span", "error")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"must be one of {[a for a in allowed if a is not None]}; "
                                  f"got {getattr(self, key)!r}", key=key)
        for key in ("max_length", "pad_to_multiple_of"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1; got {getattr(self, key)}", key=key)


def _expand(value: Any, where: str) -> Any:
    """${VAR} / $VAR in every string, recursively; an unset variable is an error naming the key."""
    if isinstance(value, str):
        missing = [a or b for a, b in _VAR.findall(value) if (a or b) not in os.environ]
        if missing:
            raise ConfigError(f"environment variable(s) {', '.join(sorted(set(missing)))} not set (in {value!r})",
                              key=where or None)
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _set(config: dict, assignment: str) -> None:
    """--set a.b.c=VALUE (VALUE parsed as YAML)."""
    import yaml
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: not a mapping", key=".".join(parts[:depth + 1]))
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({exc})", key=key.strip()) from None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _local_model_dir(written: str, resolved: str, key: str) -> str:
    """`resolved` if it is a directory; otherwise an error that says why (a hub id is not downloaded)."""
    if os.path.isdir(resolved):
        return resolved
    if _HUB_ID.fullmatch(written) and not os.path.exists(resolved):
        raise ConfigError(f"{written!r} looks like a model hub id, but models are loaded from local directories "
                          f"only (nothing is downloaded): download it first, e.g. `huggingface-cli download "
                          f"{written} --local-dir DIR`, and set {key}: DIR (no directory {resolved})", key=key)
    reason = "is a file, not a model directory" if os.path.exists(resolved) else "does not exist"
    raise ConfigError(f"{resolved} {reason} (a local directory with config.json and safetensors weights)", key=key)


def _section(build, values, section: str):
    """build(values), with a ConfigError's key moved under `section`."""
    try:
        return build(values)
    except ConfigError as exc:
        raise exc.within(section) from None


def check_training_options(training: dict) -> dict:
    """The `training:` mapping checked against transformers.TrainingArguments' field types (YAML `1e-3`
    -> 0.001; `'false'` for a bool is an error). Constructing TrainingArguments is left to the caller."""
    from transformers import TrainingArguments
    if "output_dir" in training:
        raise ConfigError("set output_dir at the top level, not under training", key="training.output_dir")
    for key in OFF_AS_NO:
        if training.get(key) is False:
            training[key] = "no"
    return coerce_fields(TrainingArguments, training, "training", aliases=TRAINING_ALIASES)


def load_config(path: os.PathLike, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Read, override, expand and check the YAML; relative paths become absolute (relative to the file).
    The returned `loss` is the checked DistillationConfig's dict (defaults filled in)."""
    import yaml
    path = Path(path)
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    config = copy.deepcopy(raw)
    for assignment in overrides or []:
        _set(config, assignment)
    config = _expand(config, "")
    for key in config:
        if key not in TOP_LEVEL:
            raise unknown_key_error(str(key), TOP_LEVEL)
    base = path.resolve().parent

    def resolve(value, where):
        if value is None:
            return None
        p = Path(coerce_value(value, str, where)).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    for role in ("student", "teacher"):
        spec = config.get(role)
        if spec is None:
            raise ConfigError("is required: {path: DIR} or {config: {model_type: ..., ...}}", key=role)
        if isinstance(spec, str):
            spec = {"path": spec}
        spec = _section(lambda values: ModelSpec(**coerce_fields(ModelSpec, values)), spec, role)
        if spec.cache is not None:
            if role != "teacher":
                raise ConfigError("only the teacher can come from a cache", key=f"{role}.cache")
            # Training from a cache never loads the teacher: its path/config are ignored, need not exist.
            config[role] = {"cache": resolve(spec.cache, f"{role}.cache")}
            continue
        if (spec.path is None) == (spec.config is None):
            raise ConfigError("give exactly one of path (a local model directory) or config", key=role)
        if spec.path is not None:
            spec.path = _local_model_dir(spec.path, resolve(spec.path, f"{role}.path"), f"{role}.path")
        elif isinstance(spec.config, str):
            spec.config = resolve(spec.config, f"{role}.config")
        elif "model_type" not in spec.config:
            raise ConfigError("must be a config directory/file or a mapping with model_type", key=f"{role}.config")
        if spec.dtype not in DTYPES:
            raise ConfigError(f"must be one of {DTYPES}; got {spec.dtype!r}", key=f"{role}.dtype")
        config[role] = {k: v for k, v in asdict(spec).items() if v is not None}
    if "seed" in config:
        config["seed"] = coerce_value(config["seed"], int, "seed")
    tokenizer = config.get("tokenizer")
    if tokenizer is None:
        tokenizer = config["student"].get("path")
        if tokenizer is None:
            raise ConfigError("is required when the student is built from a config", key="tokenizer")
        config["tokenizer"] = tokenizer
    else:
        config["tokenizer"] = resolve(tokenizer, "tokenizer")
    data = config.get("data")
    if not isinstance(data, dict) or data.get("train") is None:
        raise ConfigError("is required (a trajectory JSONL file)", key="data.train")
    data = asdict(_section(lambda values: DataOptions(**coerce_fields(DataOptions, values)), data, "data"))
    data["train"] = resolve(data["train"], "data.train")
    data["eval"] = resolve(data["eval"], "data.eval")
    config["data"] = data
    if "output_dir" not in config:
        raise ConfigError("is required", key="output_dir")
    config["output_dir"] = resolve(config["output_dir"], "output_dir")
    training = config.get("training") or {}
    if not isinstance(training, dict):
        raise ConfigError("must be a mapping of transformers.TrainingArguments options", key="training")
    config["training"] = check_training_options(training)
    loss = config.get("loss") or {}
    config["loss"] = _section(DistillationConfig.from_dict, loss, "loss").to_dict()
    return config
