"""Helpers shared by the test groups (tests/<layer>/): the backends and dtypes of the op matrix,
and multi-process workers (gloo on CPU)."""

import contextlib
import os
import socket
import sys

import torch
import torch.distributed as dist

from distillkit.core import backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def available_backends() -> list[str]:
    names = ["torch"]
    if backends.triton_usable(torch.device("cpu")):
        names.append("triton")
    if backends.native_usable(torch.device("cpu")):
        names.append("cpu")
    return names


# -- multi-process tests (gloo on CPU) ------------------------------------------------------------

def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def worker_process():
    """The body of a spawned worker. On an exception: destroy the process group (if any) and re-raise,
    for mp.spawn to report. On success: destroy it and end the process without interpreter
    finalization (os._exit(0); mp.spawn reads exit code 0 as success).

    Why not return: a group can outlive destroy_process_group (torch.compile leaves the compiled graph,
    which holds its example group, in the module's globals). If Python finalizes while a gloo thread is
    still freeing a just-finished collective, that thread frees the thread-local state captured with it,
    which holds Python objects (autograd's stashed context in backward); taking the GIL during
    finalization ends the thread inside a noexcept destructor and the worker aborts (SIGABRT,
    "terminate called without an active exception")."""
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
