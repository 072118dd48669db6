"""Teacher top-k cache: round trip, alignment with training batches, size bound, corruption handling."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from distillkit.sparse import teacher_cache as tc
from distillkit.sparse.topk import distill_loss_topk

VOCAB, K = 1271, 8


class EmbeddingTeacher:
    """A deterministic callable teacher: logits[b, i] = table[input_ids[b, i]] + position term."""

    def __init__(self, vocab=VOCAB):
        g = torch.Generator().manual_seed(1)
        self.table = torch.randn(vocab, vocab, generator=g) * 3
        self.calls = 0

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids] + 0.1 * torch.arange(ids.shape[-1])[:, None]

    def __call__(self, batch):
        self.calls += 1
        return self.logits(batch["input_ids"])


def make_examples(n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n_tok,), generator=g) for n_tok in lengths]


@pytest.fixture
def cache_dir(tmp_path):
    examples = make_examples()
    tc.write_teacher_cache(str(tmp_path), EmbeddingTeacher(), examples, k=K, batch_size=4, tokens_per_shard=60)
    return str(tmp_path), examples


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_and_size(tmp_path, dtype):
    examples = make_examples()
    teacher = EmbeddingTeacher()
    index = tc.write_teacher_cache(str(tmp_path), teacher, examples, k=K, dtype=dtype, batch_size=5,
                                   tokens_per_shard=100, temperature=2.0)
    assert index["complete"] is True and list(index)[-1] == "complete"
    assert len(index["shards"]) > 1 and index["num_tokens"] == sum(len(e) for e in examples)
    cache = tc.TeacherCache(str(tmp_path))
    assert (len(cache), cache.k, cache.vocab_size, cache.temperature) == (len(examples), K, VOCAB, 2.0)
    torch_dtype = tc.LOGPROB_DTYPES[dtype]
    for i, example in enumerate(examples):
        ids, logprobs = cache.example(i)
        want_lp, want_ids = torch.log_softmax(teacher.logits(example[None])[0] / 2.0, -1).topk(K, -1)
        assert ids.dtype == torch.int32 and logprobs.dtype == torch_dtype
        assert torch.equal(ids.long(), want_ids)
        assert torch.equal(logprobs, want_lp.to(torch_dtype))  # lossless for V <= 2**17
    assert tc.bytes_per_token(str(tmp_path)) <= 4 * K + 8
    assert not [f for f in os.listdir(tmp_path) if not f.endswith((".safetensors", ".json"))]


def test_packing_large_vocabularies():
    ids = torch.tensor([[0, 1, 131071, 99999]])
    lp = torch.tensor([[0.0, -1e-3, -7.25, -math.inf]])
    for dtype in (torch.float16, torch.bfloat16):
        got_ids, got_lp = tc.unpack(tc.pack(ids, lp, 131072, dtype), 131072, dtype)
        assert torch.equal(got_ids.long(), ids) and torch.equal(got_lp, lp.to(dtype))
        # 151936 ids need 18 bits: one mantissa bit of the log-probability is rounded away.
        big = torch.tensor([[151935, 0, 7, 100000]])
        got_ids, got_lp = tc.unpack(tc.pack(big, lp, 151936, dtype), 151936, dtype)
        assert torch.equal(got_ids.long(), big)
        finite = lp.isfinite()
        rel = ((got_lp.float() - lp.to(dtype).float()) / lp.to(dtype).float().abs().clamp_min(1e-30))[finite]
        assert rel.abs().max() <= (2**-10 if dtype == torch.float16 else 2**-7) and got_lp[0, 3] == -math.inf


def test_batches_align_with_training(cache_dir):
    path, examples = cache_dir
    cache = tc.TeacherCache(path)
    teacher = EmbeddingTeacher()
    order = [7, 2, 11, 0]
    length = max(len(examples[i]) for i in order) + 3
    for side in ("right", "left"):
        batch = cache.batch(order, length=length, lengths=[len(examples[i]) for i in order], padding_side=side)
        assert batch.ids.shape == (4, length, K) and batch.mask.sum(1).tolist() == [len(examples[i]) for i in order]
        for row, i in enumerate(order):
            n = len(examples[i])
            cols = slice(0, n) if side == "right" else slice(length - n, length)
            assert torch.equal(batch.ids[row, cols].long(),
                               torch.log_softmax(teacher.logits(examples[i][None])[0], -1).topk(K, -1)[1])
            assert (batch.ids[row][~batch.mask[row]] == -1).all()
            assert (batch.logprobs[row][~batch.mask[row]] == -math.inf).all()
    seen = [i for indices, _ in cache.iter_batches(5, shuffle=True, seed=3) for i in indices]
    assert sorted(seen) == list(range(len(examples))) and seen != sorted(seen)


def test_cache_feeds_the_topk_loss(cache_dir):
    """Padding from the cache carries no teacher signal: the padded batch's loss equals the per-example one."""
    path, examples = cache_dir
    cache = tc.TeacherCache(path)
    order = [3, 5]
    batch = cache.batch(order)
    student = torch.randn(2, batch.ids.shape[1], VOCAB)
    loss = distill_loss_topk(student, batch.ids, batch.logprobs, reduction="sum", tail="bucket")
    expected = sum(distill_loss_topk(student[row, :len(examples[i])], *cache.example(i), reduction="sum",
                                     tail="bucket") for row, i in enumerate(order))
    torch.testing.assert_close(loss, expected)


def test_length_mismatch_names_the_shard(cache_dir):
    path, examples = cache_dir
    cache = tc.TeacherCache(path)
    with pytest.raises(tc.TeacherCacheError, match=r"example 4 .*shard-\d+\.safetensors"):
        cache.batch([4], lengths=[len(examples[4]) + 1])
    with pytest.raises(tc.TeacherCacheError, match="truncate"):
        cache.batch([4], length=len(examples[4]) - 1)
    assert cache.batch([4], length=1, truncate=True).ids.shape[1] == 1


def _shard(path, n=1):
    with open(os.path.join(path, tc.INDEX_FILE)) as f:
        return json.load(f)["shards"][n]["file"]


def _rewrite_shard(path, name, tensors, metadata):
    """Replace a shard with other content and update its sha256, so that only the content check can fire."""
    import hashlib

    from safetensors.torch import save
    data = save(tensors, metadata=metadata)
    with open(os.path.join(path, name), "wb") as f:
        f.write(data)
    index_path = os.path.join(path, tc.INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    for shard in index["shards"]:
        if shard["file"] == name:
            shard["sha256"] = hashlib.sha256(data).hexdigest()
    with open(index_path, "w") as f:
        json.dump(index, f)


def _example_in(path, name):
    with open(os.path.join(path, tc.INDEX_FILE)) as f:
        return next(s["first_example"] for s in json.load(f)["shards"] if s["file"] == name)


def test_missing_and_corrupt_shards(cache_dir):
    path, _ = cache_dir
    name = _shard(path)
    first = _example_in(path, name)
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x00\x01\x02")
    with pytest.raises(tc.TeacherCacheError, match=f"{name}.*sha256"):
        tc.TeacherCache(path).example(first)
    tc.TeacherCache(path).example(0)  # other shards still read
    os.remove(os.path.join(path, name))
    with pytest.raises(tc.TeacherCacheError, match=f"{name}.*missing"):
        tc.TeacherCache(path).example(first)


def test_wrong_k_and_wrong_lengths_name_the_shard(cache_dir):
    path, _ = cache_dir
    name = _shard(path)
    first = _example_in(path, name)
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(path, name))
    _rewrite_shard(path, name, {"topk": tensors["topk"][:, :K - 1].contiguous(), "seq_lengths": tensors["seq_lengths"]},
                   {"format": tc.FORMAT, "k": str(K - 1), "first_example": str(first)})
    with pytest.raises(tc.TeacherCacheError, match=f"{name} has K={K - 1}, the index says K={K}"):
        tc.TeacherCache(path).example(first)
    lengths = tensors["seq_lengths"].clone()
    lengths[0] += 1
    lengths[-1] -= 1
    _rewrite_shard(path, name, {"topk": tensors["topk"], "seq_lengths": lengths},
                   {"format": tc.FORMAT, "k": str(K), "first_example": str(first)})
    with pytest.raises(tc.TeacherCacheError, match=f"{name}: sequence lengths"):
        tc.TeacherCache(path).example(first)


def test_half_written_cache_is_refused(tmp_path):
    class Crashes(EmbeddingTeacher):
        def __call__(self, batch):
            if self.calls == 3:
                raise RuntimeError("teacher died")
            return super().__call__(batch)

    with pytest.raises(RuntimeError, match="teacher died"):
        tc.write_teacher_cache(str(tmp_path), Crashes(), make_examples(), k=K, batch_size=2, tokens_per_shard=30)
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path))  # some shards were written
    with pytest.raises(tc.TeacherCacheError, match="incomplete"):
        tc.TeacherCache(str(tmp_path))
    with pytest.raises(FileExistsError):
        tc.write_teacher_cache(str(tmp_path), EmbeddingTeacher(), make_examples(), k=K)
    tc.write_teacher_cache(str(tmp_path), EmbeddingTeacher(), make_examples(), k=K, overwrite=True)
    assert len(tc.TeacherCache(str(tmp_path))) == len(make_examples())
    os.remove(os.path.join(tmp_path, tc.INDEX_FILE))
    with pytest.raises(tc.TeacherCacheError, match="no index.json"):
        tc.TeacherCache(str(tmp_path))


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
