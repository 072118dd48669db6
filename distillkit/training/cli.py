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
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .run_config import ConfigError, load_config

logger = logging.getLogger("distillkit.train")


# ----------------------------------------------------------------------------- building


def _torch_dtype(name: Optional[str]):
    import torch
    return {None: None, "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise ConfigError(f"{path} is not a directory (a local tokenizer directory)", key="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path} ({exc})", key="tokenizer") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer in {path} has neither a pad nor an eos token", key="tokenizer")
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked by span, never by id: pad == eos is safe
    return tokenizer


def model_config(spec: dict, role: str, tokenizer):
    """The transformers config of `spec` (no weights read): what --dry-run checks of a model."""
    from transformers import AutoConfig
    if "path" in spec:
        path = spec["path"]
        if not any(name.endswith((".safetensors", ".safetensors.index.json")) for name in os.listdir(path)):
            raise ConfigError(f"{path} has no safetensors weights (other formats are never loaded)", key=f"{role}.path")
        source, key = path, f"{role}.path"
    elif isinstance(spec["config"], str):
        source, key = spec["config"], f"{role}.config"
    else:
        values = dict(spec["config"])
        model_type = values.pop("model_type")
        values.setdefault("vocab_size", len(tokenizer))
        values.setdefault("pad_token_id", tokenizer.pad_token_id)
        values.setdefault("eos_token_id", tokenizer.eos_token_id)
        try:
            return AutoConfig.for_model(model_type, **values)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(str(exc), key=f"{role}.config") from None
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a model config from {source} ({exc})", key=key) from None


def build_model(spec: dict, role: str, tokenizer):
    """A causal LM from a local directory (safetensors only) or from a config (random weights)."""
    import torch
    from transformers import AutoModelForCausalLM
    dtype = _torch_dtype(spec.get("dtype"))
    extra = {}
    if spec.get("attn_implementation"):
        extra["attn_implementation"] = spec["attn_implementation"]
    if "path" in spec:
        try:
            return AutoModelForCausalLM.from_pretrained(spec["path"], local_files_only=True, use_safetensors=True,
                                                        dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a safetensors model from {spec['path']} ({exc})",
                              key=f"{role}.path") from None
    config = model_config(spec, role, tokenizer)
    torch.manual_seed(int(spec.get("seed", 0)))
    model = AutoModelForCausalLM.from_config(config, **extra)
    if dtype not in (None, "auto"):
        model = model.to(dtype)
    return model


def load_examples(data: dict, split: str, tokenizer):
    """The tokenized examples of data[split] ("train" or "eval"); errors name the file and line."""
    from ..data import TrajectoryError, TrajectoryTokenizer, load_tokenized, load_trajectories
    path = data[split]
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist", key=f"data.{split}")
    try:
        if data["format"] == "tokenized":
            examples = load_tokenized(path, errors=data["errors"], vocab_size=len(tokenizer))
            logger.info("%s: %d tokenized examples (%d skipped)", path, len(examples), examples.report.skipped)
        else:
            trajectories = load_trajectories(path, errors=data["errors"], format=data["format"],
                                             unknown_keys=data["unknown_keys"])
            options = {k: data[k] for k in ("max_length", "truncation", "use_chat_template", "add_eos")}
            encode = TrajectoryTokenizer(tokenizer, **options)
            examples = encode.tokenize_all(trajectories)
            stats = encode.stats
            logger.info("%s: %d trajectories (%d skipped), %d examples (%d truncated, %d without a target)", path,
                        len(trajectories), trajectories.report.skipped, len(examples), stats.truncated, stats.empty)
    except TrajectoryError as exc:
        raise ConfigError(str(exc), key=f"data.{split}") from None
    if not examples:
        raise ConfigError(f"{path} gave no trainable example", key=f"data.{split}")
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


@dataclass
class Prepared:
    """Everything a run needs but the models' weights: what --dry-run builds and checks."""

    distill_config: Any
    args: Any
    tokenizer: Any
    train: list
    evaluation: Optional[list]
    collator: Any
    teacher_cache: Any = None  # a TeacherCache when the YAML says teacher: {cache: DIR}


def prepare(config: dict, *, output_dir: Optional[str] = None) -> Prepared:
    """Every check of a run that does not load model weights: loss and training options, the tokenizer, both
    models' configs, the data (loaded and tokenized). Failures are ConfigError with the key."""
    from transformers import TrainingArguments

    from ..data import DistillationCollator
    from .config import DistillationConfig

    distill_config = DistillationConfig.from_dict(config["loss"])
    try:
        args = TrainingArguments(output_dir=output_dir or config["output_dir"], **training_defaults(config))
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), key="training") from None
    tokenizer = load_tokenizer(config["tokenizer"])
    cache_dir = config["teacher"].get("cache")
    student_config = model_config(config["student"], "student", tokenizer)
    if cache_dir is None:
        model_config(config["teacher"], "teacher", tokenizer)
    data = config["data"]
    train = load_examples(data, "train", tokenizer)
    evaluation = load_examples(data, "eval", tokenizer) if data.get("eval") else None
    collator = DistillationCollator.from_tokenizer(tokenizer, pad_to_multiple_of=data.get("pad_to_multiple_of"))
    cache = None
    if cache_dir is not None:
        cache = check_teacher_cache(cache_dir, distill_config, train, student_config.vocab_size)
        if evaluation is not None:
            raise ConfigError("a teacher cache holds the training set only: evaluation needs teacher.path",
                              key="data.eval")
    return Prepared(distill_config, args, tokenizer, train, evaluation, collator, cache)


def check_teacher_cache(path: str, distill_config, train: list, vocab_size: int):
    """The opened cache, checked against the loss options and the training examples (ConfigError otherwise)."""
    from ..sparse.teacher_cache import TeacherCacheError
    from .cached_teacher import check_cache_config, check_cache_matches, open_teacher_cache
    try:
        check_cache_config(distill_config)
    except ConfigError as exc:  # keyed by the DistillationConfig field
        raise exc.within("loss") from None
    try:
        cache = open_teacher_cache(path)
        check_cache_matches(cache, train, vocab_size, what="data.train")
    except TeacherCacheError as exc:
        raise ConfigError(str(exc), key="teacher.cache") from None
    return cache


def build_trainer(config: dict, *, output_dir: Optional[str] = None):
    """(trainer, tokenizer) for a config from load_config."""
    from transformers import set_seed

    from .trainer import DistillationTrainer

    run = prepare(config, output_dir=output_dir)
    set_seed(run.args.seed)
    student = build_model(config["student"], "student", run.tokenizer)
    # With a cache the teacher's weights are never loaded.
    teacher = build_model(config["teacher"], "teacher", run.tokenizer) if run.teacher_cache is None else None
    trainer = DistillationTrainer(model=student, teacher_model=teacher, teacher_cache=run.teacher_cache, args=run.args,
                                  distill_config=run.distill_config, data_collator=run.collator,
                                  train_dataset=run.train, eval_dataset=run.evaluation, processing_class=run.tokenizer)
    return trainer, run.tokenizer


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


def resume_checkpoint(option: Optional[str], output_dir: str) -> tuple[Optional[str], int]:
    """(checkpoint directory or None, its global step) for --resume [CHECKPOINT]."""
    if option is None:
        return None, 0
    if option == "last":
        from transformers.trainer_utils import get_last_checkpoint
        checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint in {output_dir}")
    elif not os.path.isdir(option):
        raise ConfigError(f"--resume: {option} is not a checkpoint directory")
    else:
        checkpoint = option
    state = os.path.join(checkpoint, "trainer_state.json")
    try:
        with open(state) as handle:
            step = json.load(handle)["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: {state} is not a readable trainer state ({exc})") from None
    if isinstance(step, bool) or not isinstance(step, int):
        raise ConfigError(f"--resume: {state}: global_step must be an integer; got {step!r}")
    return checkpoint, step


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set)
        if args.output_dir:
            config["output_dir"] = str(Path(args.output_dir).resolve())
        resume, resumed_step = resume_checkpoint(args.resume, config["output_dir"])
        if args.dry_run:
            prepare(config)
            print(json.dumps(config, indent=2, default=str))
            return 0
        max_steps = config["training"].get("max_steps", -1)
        if resume is not None and max_steps > 0 and resumed_step >= max_steps:
            logger.info("nothing to train: %s is at step %d and training.max_steps is %d (raise max_steps to "
                        "train on)", resume, resumed_step, max_steps)
            return 0
        trainer, tokenizer = build_trainer(config)
    except ConfigError as exc:
        print(f"distillkit train: error: {exc}", file=sys.stderr)
        return 2
    main_process = trainer.is_world_process_zero()  # under torchrun, one line per run, not per rank
    path = "logits-free" if trainer.uses_logits_free() else "logits"
    if main_process:
        teacher = (f"the teacher cache {trainer.teacher_cache.path}" if trainer.teacher_cache is not None
                   else type(trainer.teacher_model).__name__)
        logger.info("distilling %s -> %s (%s loss), output in %s", teacher, type(trainer.model).__name__, path,
                    config["output_dir"])
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config["output_dir"])
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        if main_process:
            logger.info("eval: %s", metrics)
    if main_process:
        trained = result.global_step - resumed_step
        loss = f"train loss {result.training_loss:.4f}" if trained > 0 else "no step trained (the run had finished)"
        logger.info("done: %d steps, %s; student saved to %s", result.global_step, loss, config["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
