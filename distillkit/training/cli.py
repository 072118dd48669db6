"""`distillkit train --config CONFIG.yaml`: distill a teacher into a student on agent trajectories.

    distillkit train --config run.yaml                  train (progress bar, logged loss components)
    distillkit train --config run.yaml --resume         resume from the last checkpoint in output_dir
    distillkit train --config run.yaml --set training.max_steps=10 --set loss.temperature=2
    distillkit train --config run.yaml --dry-run        validate the config and print it resolved

The YAML (read with yaml.safe_load; every key is documented in docs/TRAINER.md):

    student:   {path: DIR} | {config: {model_type: llama, hidden_size: 64, ...}, seed: 0}   (+ dtype)
    teacher:   {path: DIR} | {config: ...}                                                 (+ dtype)
    tokenizer: DIR                                  (default: the student's path)
    data:      {train: FILE.jsonl, eval: FILE.jsonl, max_length: 2048, errors: raise|skip, ...}
    output_dir: DIR
    training:  {max_steps: ..., per_device_train_batch_size: ..., ...}   transformers.TrainingArguments
    loss:      {divergence: jsd, temperature: 2.0, span_weights: {...}, curriculum: {...}, ...}

Relative paths are relative to the YAML file; ${VAR} is replaced by the environment variable VAR.
Models and tokenizers are loaded from local directories only, weights from safetensors only.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("distillkit.train")

TOP_LEVEL = ("student", "teacher", "tokenizer", "data", "output_dir", "training", "loss", "seed")
MODEL_KEYS = ("path", "config", "seed", "dtype", "attn_implementation")
DATA_KEYS = ("train", "eval", "format", "errors", "max_length", "truncation", "use_chat_template",
             "pad_to_multiple_of", "add_eos")
DTYPES = ("float32", "bfloat16", "float16", "auto")
# TrainingArguments options whose "off" value is the string "no" (an unquoted YAML `no` arrives as False).
OFF_AS_NO = ("eval_strategy", "save_strategy", "logging_strategy")
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class ConfigError(ValueError):
    """A problem with the YAML config; the message names the key."""


# ----------------------------------------------------------------------------- config


def _expand(value: Any, where: str) -> Any:
    """${VAR} / $VAR in every string, recursively; an unset variable is an error naming the key."""
    if isinstance(value, str):
        missing = [a or b for a, b in _VAR.findall(value) if (a or b) not in os.environ]
        if missing:
            raise ConfigError(f"{where}: environment variable(s) {', '.join(sorted(set(missing)))} not set "
                              f"(in {value!r})")
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
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a mapping")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: os.PathLike, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Read, override, expand and check the YAML; relative paths become absolute (relative to the file)."""
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
    unknown = set(config) - set(TOP_LEVEL)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; known: {', '.join(TOP_LEVEL)}")
    base = path.resolve().parent

    def resolve(value, where):
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a path (string); got {type(value).__name__}")
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    for role in ("student", "teacher"):
        spec = config.get(role)
        if spec is None:
            raise ConfigError(f"{role} is required: {{path: DIR}} or {{config: {{model_type: ..., ...}}}}")
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"{role} must be a mapping ({{path: DIR}} or {{config: ...}})")
        bad = set(spec) - set(MODEL_KEYS)
        if bad:
            raise ConfigError(f"{role}: unknown key(s) {sorted(bad)}; known: {', '.join(MODEL_KEYS)}")
        if ("path" in spec) == ("config" in spec):
            raise ConfigError(f"{role}: give exactly one of path (a local model directory) or config")
        if "path" in spec:
            spec["path"] = resolve(spec["path"], f"{role}.path")
        elif isinstance(spec["config"], str):
            spec["config"] = resolve(spec["config"], f"{role}.config")
        elif not isinstance(spec["config"], dict) or "model_type" not in spec["config"]:
            raise ConfigError(f"{role}.config must be a config directory/file or a mapping with model_type")
        if spec.get("dtype", "float32") not in DTYPES:
            raise ConfigError(f"{role}.dtype must be one of {DTYPES}; got {spec['dtype']!r}")
        config[role] = spec
    tokenizer = config.get("tokenizer")
    if tokenizer is None:
        tokenizer = config["student"].get("path")
        if tokenizer is None:
            raise ConfigError("tokenizer is required when the student is built from a config")
        config["tokenizer"] = tokenizer
    else:
        config["tokenizer"] = resolve(tokenizer, "tokenizer")
    data = config.get("data")
    if not isinstance(data, dict) or "train" not in data:
        raise ConfigError("data.train is required (a trajectory JSONL file)")
    bad = set(data) - set(DATA_KEYS)
    if bad:
        raise ConfigError(f"data: unknown key(s) {sorted(bad)}; known: {', '.join(DATA_KEYS)}")
    data["train"] = resolve(data["train"], "data.train")
    if data.get("eval") is not None:
        data["eval"] = resolve(data["eval"], "data.eval")
    if "output_dir" not in config:
        raise ConfigError("output_dir is required")
    config["output_dir"] = resolve(config["output_dir"], "output_dir")
    training = config.get("training") or {}
    if not isinstance(training, dict):
        raise ConfigError("training must be a mapping of transformers.TrainingArguments options")
    if "output_dir" in training:
        raise ConfigError("set output_dir at the top level, not under training")
    for key in OFF_AS_NO:
        if training.get(key) is False:
            training[key] = "no"
    config["training"] = training
    loss = config.get("loss") or {}
    if not isinstance(loss, dict):
        raise ConfigError("loss must be a mapping of DistillationConfig options")
    config["loss"] = loss
    return config


# ----------------------------------------------------------------------------- building


def _torch_dtype(name: Optional[str]):
    import torch
    return {None: None, "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer: {path} is not a directory")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked by span, never by id: pad == eos is safe
    return tokenizer


def build_model(spec: dict, role: str, tokenizer):
    """A causal LM from a local directory (safetensors only) or from a config (random weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = _torch_dtype(spec.get("dtype"))
    extra = {}
    if spec.get("attn_implementation"):
        extra["attn_implementation"] = spec["attn_implementation"]
    if "path" in spec:
        path = spec["path"]
        if not os.path.isdir(path):
            raise ConfigError(f"{role}.path: {path} is not a directory")
        try:
            return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                        dtype=dtype, **extra)
        except (OSError, EnvironmentError) as exc:
            raise ConfigError(f"{role}.path: cannot load a safetensors model from {path} ({exc})") from None
    raw = spec["config"]
    if isinstance(raw, str):
        config = AutoConfig.from_pretrained(raw, local_files_only=True)
    else:
        values = dict(raw)
        model_type = values.pop("model_type")
        values.setdefault("vocab_size", len(tokenizer))
        values.setdefault("pad_token_id", tokenizer.pad_token_id)
        values.setdefault("eos_token_id", tokenizer.eos_token_id)
        try:
            config = AutoConfig.for_model(model_type, **values)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{role}.config: {exc}") from None
    torch.manual_seed(int(spec.get("seed", 0)))
    model = AutoModelForCausalLM.from_config(config, **extra)
    if dtype not in (None, "auto"):
        model = model.to(dtype)
    return model


def load_examples(data: dict, path: str, tokenizer):
    from ..data import TrajectoryTokenizer, load_trajectories
    if not os.path.isfile(path):
        raise ConfigError(f"data: {path} does not exist")
    trajectories = load_trajectories(path, errors=data.get("errors", "raise"), format=data.get("format"))
    options = {k: data[k] for k in ("max_length", "truncation", "use_chat_template", "add_eos") if k in data}
    encode = TrajectoryTokenizer(tokenizer, **options)
    examples = encode.tokenize_all(trajectories)
    stats = encode.stats
    logger.info("%s: %d trajectories (%d skipped), %d examples (%d truncated, %d without a target)", path,
                len(trajectories), trajectories.report.skipped, len(examples), stats.truncated, stats.empty)
    if not examples:
        raise ConfigError(f"data: {path} gave no trainable example")
    return examples


def training_defaults(config: dict) -> dict:
    """The TrainingArguments keywords: config["training"] plus defaults it does not set."""
    import torch
    training = dict(config["training"])
    training.setdefault("report_to", "none")
    training.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    if "seed" in config:
        training.setdefault("seed", config["seed"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        # Under torchrun without an accelerator, TrainingArguments needs use_cpu=True for DDP (gloo);
        # otherwise every rank trains its own unsynchronized copy, with only a warning.
        training.setdefault("use_cpu", True)
    return training


def build_trainer(config: dict, *, output_dir: Optional[str] = None):
    """(trainer, tokenizer) for a config from load_config."""
    from transformers import TrainingArguments

    from ..data import DistillationCollator
    from .trainer import DistillationConfig, DistillationTrainer

    try:
        distill_config = DistillationConfig.from_dict(config["loss"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss: {exc}") from None
    training = training_defaults(config)
    try:
        args = TrainingArguments(output_dir=output_dir or config["output_dir"], **training)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training: {exc}") from None
    from transformers import set_seed
    set_seed(args.seed)
    tokenizer = load_tokenizer(config["tokenizer"])
    student = build_model(config["student"], "student", tokenizer)
    teacher = build_model(config["teacher"], "teacher", tokenizer)
    data = config["data"]
    train = load_examples(data, data["train"], tokenizer)
    evaluation = load_examples(data, data["eval"], tokenizer) if data.get("eval") else None
    collator = DistillationCollator.from_tokenizer(tokenizer, pad_to_multiple_of=data.get("pad_to_multiple_of"))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, distill_config=distill_config,
                                  data_collator=collator, train_dataset=train, eval_dataset=evaluation,
                                  processing_class=tokenizer)
    return trainer, tokenizer


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillkit train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--config", required=True, help="the YAML config")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or from the last checkpoint in output_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path; VALUE is parsed as YAML); repeatable")
    parser.add_argument("--output-dir", default=None, help="override output_dir")
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, exit")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set)
        if args.output_dir:
            config["output_dir"] = str(Path(args.output_dir).resolve())
        if args.dry_run:
            print(json.dumps(config, indent=2, default=str))
            return 0
        trainer, tokenizer = build_trainer(config)
        resume = args.resume
        if resume == "last":
            from transformers.trainer_utils import get_last_checkpoint
            resume = get_last_checkpoint(config["output_dir"]) if os.path.isdir(config["output_dir"]) else None
            if resume is None:
                raise ConfigError(f"--resume: no checkpoint in {config['output_dir']}")
        elif resume is not None and not os.path.isdir(resume):
            raise ConfigError(f"--resume: {resume} is not a checkpoint directory")
    except ConfigError as exc:
        print(f"distillkit train: error: {exc}", file=sys.stderr)
        return 2
    main_process = trainer.is_world_process_zero()  # under torchrun, one line per run, not per rank
    path = "logits-free" if trainer.uses_logits_free() else "logits"
    if main_process:
        logger.info("distilling %s -> %s (%s loss), output in %s", type(trainer.teacher_model).__name__,
                    type(trainer.model).__name__, path, config["output_dir"])
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config["output_dir"])
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        if main_process:
            logger.info("eval: %s", metrics)
    if main_process:
        logger.info("done: %d steps, train loss %.4f; student saved to %s", result.global_step,
                    result.training_loss, config["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
