"""`distillkit cache-teacher`: run the teacher once over the training data and store K log-probabilities
per token (a teacher cache), so that training never loads the teacher.

    distillkit cache-teacher --config run.yaml --out cache/ --k 64                  the teacher's top 64
    distillkit cache-teacher --config run.yaml --out cache/ --k 64 --mode sample    64 draws (unbiased)
    distillkit cache-teacher --config run.yaml --out cache/ --k 64 --resume         finish an interrupted run
    torchrun --nproc-per-node 4 -m distillkit cache-teacher --config run.yaml --out cache/ --k 64

It reads the teacher, tokenizer and data sections of the YAML that `distillkit train` takes: data.train is
tokenized exactly as training does, and only the teacher is loaded. Train from the cache with
`teacher: {cache: cache/}` (--out defaults to teacher.cache when the YAML has it, next to teacher.path).
Under torchrun every process runs the teacher on a contiguous part of the examples and they write one
cache. The format, the storage per token and top-k vs sample are in docs/SPARSE.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from datetime import timedelta
from typing import Optional

from .run_config import ConfigError, load_config

logger = logging.getLogger("distillkit.cache_teacher")

MODES = ("topk", "sample")
DTYPES = ("float16", "bfloat16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillkit cache-teacher", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--config", required=True, metavar="RUN.yaml", help="the YAML of `distillkit train`")
    parser.add_argument("--out", default=None, metavar="DIR", help="the cache folder (default: teacher.cache)")
    parser.add_argument("--k", required=True, type=int, help="entries per token (4 K bytes per token)")
    parser.add_argument("--mode", default="topk", metavar="topk|sample",
                        help="topk: the K most likely ids; sample: K draws, stored as counts / K (default topk)")
    parser.add_argument("--temperature", type=float, metavar="T", default=1.0,
                        help="store softmax(logits / T) (default 1: the raw teacher)")
    parser.add_argument("--batch-size", type=int, metavar="B", default=8,
                        help="examples per teacher forward (default 8)")
    parser.add_argument("--seed", type=int, metavar="S", default=0, help="the draws of --mode sample (default 0)")
    parser.add_argument("--dtype", default="float16", metavar="float16|bfloat16",
                        help="of the stored log-probabilities (default float16)")
    parser.add_argument("--tokens-per-shard", type=int, metavar="N", default=2**20,
                        help="shard size (default 2**20 tokens)")
    parser.add_argument("--device", default=None, help="default: cuda (this rank's GPU) when there is one, else cpu")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted write in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path; VALUE is parsed as YAML); repeatable")
    return parser


def check_options(args: argparse.Namespace) -> None:
    """The command-line values; ConfigError naming the option."""
    for option, value in (("--k", args.k), ("--batch-size", args.batch_size),
                          ("--tokens-per-shard", args.tokens_per_shard)):
        if value < 1:
            raise ConfigError(f"must be an integer >= 1; got {value}", key=option)
    if args.seed < 0:
        raise ConfigError(f"must be an integer >= 0; got {args.seed}", key="--seed")
    if args.mode not in MODES:
        raise ConfigError(f"must be one of {list(MODES)}; got {args.mode!r}", key="--mode")
    if args.dtype not in DTYPES:
        raise ConfigError(f"must be one of {list(DTYPES)}; got {args.dtype!r}", key="--dtype")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(f"must be a finite number > 0; got {args.temperature}", key="--temperature")
    if args.resume and args.overwrite:
        raise ConfigError("--overwrite replaces the cache, --resume continues it: give one of them", key="--resume")


def load_teacher_config(path: str, overrides: list[str]) -> tuple[dict, Optional[str]]:
    """The YAML as `distillkit train` reads it, with the teacher's model even when the YAML trains from a
    cache (teacher: {path: ..., cache: DIR}, where train ignores the path); and that DIR, or None."""
    config = load_config(path, overrides)
    cache = config["teacher"].get("cache")
    if cache is None:
        return config, None
    try:
        config = load_config(path, [*overrides, "teacher.cache=null"])
    except ConfigError as exc:
        if exc.key == "teacher":  # teacher: {cache: DIR} alone: nothing to run
            raise ConfigError("is required: cache-teacher runs the teacher model, so give teacher.path (a local "
                              "model directory) or teacher.config; teacher.cache only says where training reads "
                              "the cache", key="teacher.path") from None
        raise
    return config, cache


def start_processes(device: Optional[str]):
    """(rank, world size, this process's device). Under torchrun, a gloo group: the ranks exchange a few
    ints only (each runs the teacher on its own device), with a long timeout, because at the end the ranks
    wait for the slowest one."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=48))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device is not None:
        return rank, world, torch.device(device)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def progress_bar():
    """tokens/s and ETA on stderr (write_teacher_cache sets the total)."""
    from tqdm import tqdm
    return tqdm(desc="teacher cache", unit="tok", unit_scale=True, smoothing=0.1, mininterval=0.5, file=sys.stderr)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def summary(out: str, index: dict, seconds: float) -> str:
    """The last line: what was cached, what it costs on disk, how long it took."""
    shards = sum(os.path.getsize(os.path.join(out, s["file"])) for s in index["shards"])
    total = shards + os.path.getsize(os.path.join(out, "index.json"))
    tokens = index["num_tokens"]
    return (f"cache-teacher: {index['num_examples']} examples, {tokens} tokens, "
            f"{shards / max(tokens, 1):.1f} bytes/token (k={index['k']}, {index.get('mode', 'topk')}), "
            f"cache size {_size(total)} in {out}, wall time {seconds:.1f} s")


def run(args: argparse.Namespace, started: float) -> Optional[str]:
    """The cache of args; its summary line on rank 0 (None on the other ranks)."""
    from ..sparse.teacher_cache import write_teacher_cache
    from .cli import build_model, load_examples, load_tokenizer

    check_options(args)
    config, cache_dir = load_teacher_config(args.config, args.set)
    out = args.out or cache_dir
    if out is None:
        raise ConfigError("is required (or set teacher.cache in the YAML)", key="--out")
    tokenizer = load_tokenizer(config["tokenizer"])
    examples = load_examples(config["data"], "train", tokenizer)
    rank, world, device = start_processes(args.device)
    teacher = build_model(config["teacher"], "teacher", tokenizer).to(device).eval()
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", None) or getattr(teacher.config, "vocab_size", None)
    if vocab is not None and args.k > vocab:
        raise ConfigError(f"must be <= the teacher's vocabulary ({vocab}); got {args.k}", key="--k")
    if rank == 0:
        logger.info("caching %s (%s, k=%d) over %d examples in %s%s", type(teacher).__name__, args.mode, args.k,
                    len(examples), out, f" with {world} processes" if world > 1 else "")
    bar = progress_bar() if rank == 0 else None
    try:
        index = write_teacher_cache(out, teacher, examples, k=args.k, mode=args.mode, seed=args.seed,
                                    dtype=args.dtype, temperature=args.temperature, batch_size=args.batch_size,
                                    tokens_per_shard=args.tokens_per_shard, pad_token_id=tokenizer.pad_token_id,
                                    device=device, overwrite=args.overwrite, resume=args.resume, progress=bar,
                                    distributed=True)
    finally:
        if bar is not None:
            bar.close()
    return summary(out, index, time.perf_counter() - started) if rank == 0 else None


def main(argv=None) -> int:
    started = time.perf_counter()
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import torch.distributed as dist

    from ..sparse.teacher_cache import TeacherCacheError
    owns_group = not (dist.is_available() and dist.is_initialized())  # a caller's group is left alone
    try:
        line = run(args, started)
    except (ConfigError, TeacherCacheError, FileExistsError) as exc:
        where = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"distillkit cache-teacher: error{where}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distillkit cache-teacher: interrupted; the shards written are kept: rerun with --resume to continue",
              file=sys.stderr)
        return 130
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if line is not None:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
