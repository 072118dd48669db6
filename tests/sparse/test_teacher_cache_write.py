"""Writing a teacher cache: sample mode (the empirical teacher distribution), absent entries, resuming an
interrupted write, progress hooks, and one cache written by two processes (gloo)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, worker_process
from test_teacher_cache import VOCAB, EmbeddingTeacher, make_examples

from distillkit.sparse import teacher_cache as tc
from distillkit.sparse.cache_sampling import example_generator
from distillkit.sparse.topk import distill_loss_topk

K = 8


def write(path, examples=None, teacher=None, **options):
    options = {"k": K, "batch_size": 4, "tokens_per_shard": 60, **options}
    examples = make_examples() if examples is None else examples
    return tc.write_teacher_cache(str(path), teacher or EmbeddingTeacher(), examples, **options)


def read_all(path):
    cache = tc.TeacherCache(str(path))
    return [cache.example(i) for i in range(len(cache))]


def assert_same_examples(a, b):
    assert len(a) == len(b)
    for i, ((ids_a, lp_a), (ids_b, lp_b)) in enumerate(zip(a, b)):
        assert torch.equal(ids_a, ids_b) and torch.equal(lp_a, lp_b), f"example {i}"


def files_of(path):
    """{name: bytes} of the index and every shard it lists."""
    index = tc.load_index(str(path))
    names = [tc.INDEX_FILE] + [s["file"] for s in index["shards"]]
    return {name: open(os.path.join(path, name), "rb").read() for name in names}


class DiesAfter(EmbeddingTeacher):
    """Raises `error` on the call after `calls` batches (KeyboardInterrupt: a Ctrl-C mid-write)."""

    def __init__(self, calls, error=KeyboardInterrupt):
        super().__init__()
        self.limit, self.error = calls, error

    def __call__(self, batch):
        if self.calls == self.limit:
            raise self.error("stopped")
        return super().__call__(batch)


# -- sample mode ---------------------------------------------------------------------------------------

def test_sample_mode_stores_the_empirical_distribution(tmp_path):
    examples, teacher, seed = make_examples(), EmbeddingTeacher(), 11
    index = write(tmp_path, examples, mode="sample", seed=seed, temperature=2.0)
    assert (index["mode"], index["seed"], index["version"]) == ("sample", seed, 2)
    cache = tc.TeacherCache(str(tmp_path))
    assert (cache.mode, cache.seed, cache.temperature) == ("sample", seed, 2.0)
    absent = 0
    for i, example in enumerate(examples):
        ids, logprobs = cache.example(i)
        probs = torch.softmax(teacher.logits(example[None])[0] / 2.0, -1)
        draws = torch.multinomial(probs, K, replacement=True, generator=example_generator(seed, i))
        for position in range(len(example)):
            present = ids[position] >= 0
            absent += int((~present).sum())
            assert present.sum() >= 1 and not present[present.sum():].any()  # absent entries last
            assert (logprobs[position][~present] == -math.inf).all()
            counts = logprobs[position][present].float().exp() * K
            torch.testing.assert_close(counts, counts.round(), atol=0.02, rtol=0)  # count / k, as fp16
            stored = dict(zip(ids[position][present].tolist(), counts.round().long().tolist()))
            assert len(stored) == int(present.sum())  # distinct ids
            assert sum(stored.values()) == K and stored == dict(Counter(draws[position].tolist()))
            assert list(stored.values()) == sorted(stored.values(), reverse=True)
    assert absent > 0  # some positions drew fewer than K distinct ids


def test_sample_mode_depends_only_on_the_seed_and_the_example(tmp_path):
    write(tmp_path / "a", mode="sample", seed=3)
    reference = read_all(tmp_path / "a")
    write(tmp_path / "b", mode="sample", seed=3, batch_size=1, tokens_per_shard=1000)
    assert_same_examples(read_all(tmp_path / "b"), reference)
    write(tmp_path / "c", mode="sample", seed=4, batch_size=7)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(read_all(tmp_path / "c"), reference))
    # top-k does not draw: the seed is not recorded and the batch size does not matter either
    index = write(tmp_path / "d", seed=5)
    assert (index["mode"], index["seed"], index["version"]) == ("topk", None, 1)
    write(tmp_path / "e", batch_size=1)
    assert_same_examples(read_all(tmp_path / "d"), read_all(tmp_path / "e"))


def test_absent_entries_never_reach_the_loss(tmp_path):
    """The loss from the cache equals the float64 KL against the empirical distribution: the filler ids of
    absent entries are read as -1 (as stored, they repeat id 0, which would count twice)."""
    examples = make_examples(4)
    write(tmp_path, examples, mode="sample", seed=0, k=16)
    cache = tc.TeacherCache(str(tmp_path))
    for i, example in enumerate(examples):
        ids, logprobs = cache.example(i)
        student = torch.randn(len(example), VOCAB, dtype=torch.float64)
        loss = distill_loss_topk(student.float(), ids, logprobs, reduction="sum", tail="renormalize")
        expected = 0.0
        for position in range(len(example)):
            present = ids[position] >= 0
            support, p = ids[position][present].long(), logprobs[position][present].double().exp()
            p = p / p.sum()
            q = torch.softmax(student[position], -1)[support]
            expected += float((p * (p.log() - (q / q.sum()).log())).sum())
        torch.testing.assert_close(float(loss), expected, rtol=1e-3, atol=1e-4)


def test_minus_inf_entries_are_absent_in_topk_mode_too(tmp_path):
    class Masked(EmbeddingTeacher):  # only 3 ids have any probability
        def logits(self, ids):
            out = torch.full((*ids.shape, VOCAB), -math.inf)
            out[..., :3] = super().logits(ids)[..., :3]
            return out

    examples = make_examples(3)
    write(tmp_path, examples, teacher=Masked())
    for ids, logprobs in read_all(tmp_path):
        assert (ids[:, 3:] == -1).all() and (logprobs[:, 3:] == -math.inf).all()
        assert (ids[:, :3].sort(-1).values == torch.arange(3, dtype=torch.int32)).all()


@pytest.mark.parametrize("corrupt, problem", [
    pytest.param(lambda ids, lp: (ids.index_fill(1, torch.tensor([1]), 7).index_fill(1, torch.tensor([0]), 7), lp),
                 "an id twice at one position", id="duplicate"),
    pytest.param(lambda ids, lp: (ids, lp.index_fill(1, torch.tensor([2]), math.nan)), "a NaN", id="nan"),
])
def test_shard_entries_are_checked(tmp_path, corrupt, problem):
    """A shard with a repeated id (or NaN) that still matches its sha256 is refused when first read."""
    import hashlib

    from safetensors.torch import load_file, save
    write(tmp_path, make_examples(3))
    index = tc.load_index(str(tmp_path))
    name = index["shards"][0]["file"]
    tensors = load_file(os.path.join(tmp_path, name))
    ids, lp = tc.unpack(tensors["topk"], VOCAB, torch.float16)
    ids, lp = corrupt(ids.long(), lp.float())
    data = save({**tensors, "topk": tc.pack(ids, lp, VOCAB, torch.float16)},
                metadata={"format": tc.FORMAT, "k": str(K), "first_example": "0"})
    open(os.path.join(tmp_path, name), "wb").write(data)
    index["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    json.dump(index, open(os.path.join(tmp_path, tc.INDEX_FILE), "w"))
    with pytest.raises(tc.TeacherCacheError, match=f"{name}: tensor 'topk' holds {problem}"):
        tc.TeacherCache(str(tmp_path)).example(0)
    tc.TeacherCache(str(tmp_path), verify=False).example(0)  # verify=False trusts the files


def test_index_written_before_modes_reads_as_topk(tmp_path):
    write(tmp_path)
    index = {k: v for k, v in tc.load_index(str(tmp_path)).items() if k not in ("mode", "seed")}
    json.dump(index, open(os.path.join(tmp_path, tc.INDEX_FILE), "w"))
    cache = tc.TeacherCache(str(tmp_path))
    assert (cache.mode, cache.seed) == ("topk", None)


def test_huggingface_causal_lm(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    examples = [{"input_ids": torch.randint(0, 300, (n,)).tolist()} for n in (5, 12, 3)]
    tc.write_teacher_cache(str(tmp_path), model, examples, k=4, batch_size=2)
    cache = tc.TeacherCache(str(tmp_path))
    for i, example in enumerate(examples):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        ids, logprobs = cache.example(i)
        want_lp, want_ids = torch.log_softmax(logits, -1).topk(4, -1)
        assert torch.equal(ids.long(), want_ids)
        torch.testing.assert_close(logprobs.float(), want_lp, atol=2e-3, rtol=1e-3)


# -- resume --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["topk", "sample"])
@pytest.mark.parametrize("calls", [0, 3])
def test_resume_after_ctrl_c_equals_an_uninterrupted_write(tmp_path, mode, calls):
    write(tmp_path / "whole", mode=mode, seed=2)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "cut", teacher=DiesAfter(calls), mode=mode, seed=2)
    with open(tmp_path / "cut" / tc.INDEX_FILE) as f:
        assert json.load(f)["complete"] is False
    with pytest.raises(FileExistsError, match=r"--resume"):
        write(tmp_path / "cut", mode=mode, seed=2)
    done = tc.load_index(str(tmp_path / "cut"), allow_incomplete=True)["num_examples"]
    assert (done > 0) == (calls > 0)
    teacher = EmbeddingTeacher()
    write(tmp_path / "cut", teacher=teacher, mode=mode, seed=2, resume=True)
    assert teacher.calls == -(-(len(make_examples()) - done) // 4)  # what the shards hold is not redone
    assert files_of(tmp_path / "cut") == files_of(tmp_path / "whole")
    assert sorted(os.listdir(tmp_path / "cut")) == sorted(os.listdir(tmp_path / "whole"))  # no leftovers
    teacher = EmbeddingTeacher()
    assert write(tmp_path / "cut", teacher=teacher, mode=mode, seed=2, resume=True) == tc.load_index(
        str(tmp_path / "whole")) and teacher.calls == 0  # resuming a complete cache checks it, writes nothing


def _longer_first(examples):
    return [torch.cat([examples[0], examples[0][:1]])] + examples[1:]


class WiderTeacher(EmbeddingTeacher):
    def __init__(self):
        super().__init__(VOCAB + 1)


SAMPLED = {"mode": "sample", "seed": 2}


@pytest.mark.parametrize("first, change, field", [
    (SAMPLED, {"k": K + 1}, "field 'k': the cache was written with 8, this write asks for 9"),
    ({}, {"mode": "sample"}, "field 'mode': the cache was written with 'topk'"),
    (SAMPLED, {"seed": 3}, "field 'seed': the cache was written with 2, this write asks for 3"),
    (SAMPLED, {"dtype": "bfloat16"}, "field 'logprob_dtype'"),
    (SAMPLED, {"temperature": 2.0}, "field 'temperature'"),
    (SAMPLED, {"examples": _longer_first(make_examples())}, r"field 'seq_lengths\[0\]': example 0 has"),
    (SAMPLED, {"examples": make_examples()[:2]}, "field 'num_examples'"),
    (SAMPLED, {"teacher": WiderTeacher()}, "field 'vocab_size': the teacher returns 1272 logits"),
])
def test_resume_with_other_parameters_names_the_field(tmp_path, first, change, field):
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, teacher=DiesAfter(3), **first)
    with pytest.raises(tc.TeacherCacheError, match=field):
        write(tmp_path, **{**first, **change, "resume": True})


def test_resume_arguments(tmp_path):
    with pytest.raises(ValueError, match="pass one of them"):
        write(tmp_path, resume=True, overwrite=True)
    write(tmp_path / "fresh", resume=True)  # nothing to resume: a plain write
    with pytest.raises(FileExistsError, match="overwrite"):
        write(tmp_path / "fresh")
    with pytest.raises(tc.TeacherCacheError, match="the cache is complete with 13 examples, the data has more"):
        write(tmp_path / "fresh", make_examples() + make_examples(1), resume=True)


def test_progress_hooks(tmp_path):
    examples = make_examples()
    seen = []
    write(tmp_path / "a", examples, progress=seen.append)
    assert len(seen) == 4 and sum(seen) == sum(len(e) for e in examples)

    class Bar:  # the part of tqdm's interface the writer uses
        def __init__(self):
            self.total, self.n = "unset", 0

        def reset(self, total=None):
            self.total, self.n = total, 0

        def update(self, n):
            self.n += n

    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "b", examples, teacher=DiesAfter(2), progress=Bar())
    done = tc.load_index(str(tmp_path / "b"), allow_incomplete=True)["num_examples"]
    bar = Bar()
    write(tmp_path / "b", examples, resume=True, progress=bar)
    assert 0 < done < len(examples) and bar.total == bar.n == sum(len(e) for e in examples[done:])


# -- two processes, one cache -------------------------------------------------------------------------

def _two_rank_worker(rank, world, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with worker_process():
        examples = make_examples()
        # rank 1's teacher dies: both ranks raise, the parts written are kept
        teacher = DiesAfter(1, RuntimeError) if rank == 1 else EmbeddingTeacher()
        with pytest.raises(RuntimeError if rank == 1 else tc.TeacherCacheError):
            write(path, examples, teacher=teacher, mode="sample", seed=9, distributed=True)
        # an unfinished cache without resume: rank 0 says why, rank 1 that rank 0 stopped
        with pytest.raises(FileExistsError if rank == 0 else tc.TeacherCacheError, match="--resume|rank 0"):
            write(path, examples, mode="sample", seed=9, distributed=True)
        index = write(path, examples, mode="sample", seed=9, resume=True, distributed=True)
        assert index == tc.load_index(path) and index["num_examples"] == len(examples)


def test_two_processes_write_one_cache(tmp_path):
    path = str(tmp_path / "split")
    mp.spawn(_two_rank_worker, args=(2, free_port(), path), nprocs=2, join=True)
    write(tmp_path / "one", mode="sample", seed=9)
    assert_same_examples(read_all(path), read_all(tmp_path / "one"))
    index = tc.load_index(path)
    assert {s["file"].split("-")[1] for s in index["shards"]} == {"rank00000", "rank00001"}
    assert sorted(os.listdir(path)) == sorted([tc.INDEX_FILE] + [s["file"] for s in index["shards"]])
    one = tc.load_index(str(tmp_path / "one"))
    assert {k: v for k, v in index.items() if k != "shards"} == {k: v for k, v in one.items() if k != "shards"}
