"""Build a tiny, fully local distillation workspace (no download, CPU is enough).

    python examples/make_tiny.py /tmp/tiny        # tokenizer/, teacher/, student/, trajectories.jsonl
    TINY_DIR=/tmp/tiny distillkit train --config examples/train_tiny.yaml

What it writes under the target directory:

- trajectories.jsonl: synthetic tool-using agent trajectories (native format, see docs/DATA.md)
  with 0 to 3 tool calls each, so that a curriculum has easy and hard samples;
- tokenizer/: a byte-level BPE trained on their plain rendering, saved as a Hugging Face fast
  tokenizer (eos = pad = "<|endoftext|>");
- teacher/ and student/: tiny Llama models built from configs with random weights, saved as
  safetensors (the teacher is a bit wider than the student; same vocabulary).

`build_workspace` is also what tests/test_trainer.py uses.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Optional

CITIES = ["Paris", "Berlin", "Lima", "Oslo", "Tokyo", "Cairo", "Quito", "Perth"]
EOS = "<|endoftext|>"


def make_trajectories(n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """n native-format trajectories; trajectory i makes i % 4 tool calls."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        city, other = rng.sample(CITIES, 2)
        steps = []
        calls = i % 4
        temps = []
        for k in range(calls):
            target = city if k % 2 == 0 else other
            temp = rng.randint(-5, 35)
            temps.append(temp)
            steps.append({"reasoning": f"I should check the weather in {target}.",
                          "tool_call": {"name": "weather", "arguments": {"city": target}},
                          "tool_result": f"{temp}C and {'sunny' if temp > 15 else 'cloudy'}"})
        if calls:
            answer = f"It is {temps[0]}C in {city}."
        else:
            steps.append({"reasoning": "I can answer without a tool."})
            answer = f"{city} is a city."
        out.append({"id": f"t{i}", "system": "You are a helpful agent.",
                    "user": f"What is the weather in {city}?", "steps": steps, "answer": answer})
    return out


def write_jsonl(path: os.PathLike, records) -> None:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def train_tokenizer(records, vocab_size: int = 400):
    """A byte-level BPE trained on the plain rendering of `records`, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distillkit.data import parse_trajectory, render_plain

    texts = [render_plain(parse_trajectory(r), eos_token=EOS).text for r in records]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def tiny_config(kind: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                ffn: int = 64, pad_token_id: Optional[int] = None, eos_token_id: Optional[int] = None, **extra):
    """A tiny LlamaConfig ("llama") or Qwen2Config ("qwen2")."""
    from transformers import AutoConfig
    return AutoConfig.for_model(kind, vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                                max_position_embeddings=512, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                bos_token_id=None, **extra)


def make_model(kind: str, vocab_size: int, seed: int = 0, **size):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, vocab_size, **size))


def build_workspace(out_dir: os.PathLike, *, n_trajectories: int = 32, seed: int = 0, kind: str = "llama",
                    models: bool = True) -> dict[str, str]:
    """Write the workspace (see the module docstring); returns {"data", "tokenizer", "teacher", "student"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = make_trajectories(n_trajectories, seed)
    write_jsonl(out / "trajectories.jsonl", records)
    tokenizer = train_tokenizer(records)
    tokenizer.save_pretrained(out / "tokenizer")
    paths = {"data": str(out / "trajectories.jsonl"), "tokenizer": str(out / "tokenizer")}
    if models:
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        teacher = make_model(kind, len(tokenizer), seed=seed + 1, hidden=48, ffn=96, **ids)
        student = make_model(kind, len(tokenizer), seed=seed + 2, hidden=32, ffn=64, **ids)
        for name, model in (("teacher", teacher), ("student", student)):
            model.save_pretrained(out / name, safe_serialization=True)
            paths[name] = str(out / name)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to create (tokenizer/, teacher/, student/, trajectories.jsonl)")
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--kind", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_workspace(args.out_dir, n_trajectories=args.trajectories, seed=args.seed, kind=args.kind)
    for name, path in paths.items():
        print(f"{name:10s} {path}")
    print(f"next: TINY_DIR={args.out_dir} distillkit train --config examples/train_tiny.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
