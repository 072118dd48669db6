"""Independent pieces of the demo (one agent's evaluation, one fallback curve) in forked processes.

Each piece runs exactly as it would in this process (same models, same batches, one torch thread, as
the demo's main process by default), so the results do not depend on the number of workers. A child
returns its result as JSON text over a pipe: nothing is pickled.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Hashable, Sequence

import torch


def _child(fn: Callable[[Hashable], Any], key: Hashable, conn) -> None:  # pragma: no cover - runs in a child
    torch.set_num_threads(1)
    try:
        payload = {"result": fn(key)}
    except BaseException:
        payload = {"error": traceback.format_exc()}
    conn.send_bytes(json.dumps(payload).encode())
    conn.close()


def fork_map(fn: Callable[[Hashable], Any], keys: Sequence[Hashable], *, workers: int, bar=None) -> dict:
    """{key: fn(key)}, `workers` forked processes at a time; fn's result must be JSON-serializable (it comes
    back through JSON: tuples as lists). bar: a tqdm-like object advanced by one per finished key. With
    workers <= 1, or where fork is unavailable, the keys run one after the other in this process."""
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        results = {}
        for key in keys:
            results[key] = json.loads(json.dumps(fn(key)))  # the same types as from a child
            if bar is not None:
                bar.update(1)
        return results
    ctx = mp.get_context("fork")
    pending, running, results = list(keys), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            key = pending.pop(0)
            read, write = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, key, write), daemon=True)
            proc.start()
            write.close()  # the child holds the write end: EOF here when it exits
            running[read] = (key, proc)
        for read in wait(list(running)):
            key, proc = running.pop(read)
            try:
                payload = json.loads(read.recv_bytes())
            except EOFError:
                proc.join()
                raise RuntimeError(f"{key}: the worker died (exit code {proc.exitcode})") from None
            finally:
                read.close()
            proc.join()
            if "error" in payload:
                raise RuntimeError(f"{key} failed in its worker:\n{payload['error']}")
            results[key] = payload["result"]
            if bar is not None:
                bar.update(1)
    return {key: results[key] for key in keys}
