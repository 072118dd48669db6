"""Fixtures of the trainer tests: a tiny workspace (tokenizer, trajectories) from examples/make_tiny.py,
and one thread for the tiny matmuls."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

from distillkit.data import TrajectoryTokenizer, load_trajectories  # noqa: E402
from trainer_helpers import make_tiny  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster, and much faster on a loaded machine (no spinning workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    paths = make_tiny.build_workspace(out, n_trajectories=32, models=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    examples = TrajectoryTokenizer(tokenizer, max_length=128).tokenize_all(load_trajectories(paths["data"]))
    assert len(examples) == 32
    return {"paths": paths, "tokenizer": tokenizer, "examples": examples}
