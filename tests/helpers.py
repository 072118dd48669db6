"""Helpers shared by the test groups (tests/<layer>/): the devices, backends and dtypes of the op matrix,
and multi-process workers (gloo on CPU)."""

import contextlib
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from distillkit.core import backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# The matrix runs on every device here: CPU always (Triton through the interpreter, see conftest.py),
# and CUDA where there is a GPU, so that the same tests check compiled Triton and the cuda backend.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def available_backends(device: str = "cpu", op: str = "rows") -> list[str]:
    """The backends (registry order) that run `op` ("rows": the dense op, "topk") on `device` here."""
    names = []
    for name in backends.REGISTRY:
        try:
            backends.resolve(name, torch.device(device), torch.float32, op=op)
        except ValueError:
            continue
        names.append(name)
    return names


def compiled(fn, device: str):
    """torch.compile(fn, fullgraph=True): Inductor on CUDA; on CPU "aot_eager", which traces the same graph
    through AOTAutograd and the ops' fake implementations without compiling C++ for every case."""
    torch._dynamo.reset()  # a fresh cache: the matrix's shapes and options would hit the recompile limit
    return torch.compile(fn, fullgraph=True, dynamic=False, backend="inductor" if device == "cuda" else "aot_eager")


# -- host-device synchronization ----------------------------------------------------------------

# aten ops that read a tensor's value back to the host (.item(), bool(), data-dependent shapes)
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "unique", "_unique2",
               "repeat_interleave", "equal", "allclose"}


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op dispatched inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# -- multi-process tests (gloo on CPU) ------------------------------------------------------------

def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(rank: int, world: int, port: int) -> None:
    """A spawned worker's torchrun environment (rendezvous on 127.0.0.1:port) and one torch thread: what
    TrainingArguments and init_process_group / init_device_mesh read."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def spawn_and_wait(worker, args: tuple, nprocs: int, timeout_s: float, what: str = "workers") -> None:
    """torch.multiprocessing.spawn(worker, args, nprocs); a failed worker re-raises here, and one still
    running after timeout_s fails the test (every worker is killed on the way out)."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):  # raises ProcessRaisedException if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {what} did not finish in {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


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
