"""Teacher top-k cache: round trip, alignment with training batches, size bound, corruption handling."""

from __future__ import annotations

import io
import json
import math
import os
import re

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


def _replace_shard(path, name, data):
    """Replace a shard's bytes and update its sha256, so that only the content checks can fire."""
    import hashlib

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
    cache = tc.TeacherCache(path)
    os.remove(os.path.join(path, name))
    with pytest.raises(tc.TeacherCacheError, match=f"{name}.*missing"):  # removed after opening: on read
        cache.example(first)
    with pytest.raises(tc.TeacherCacheError, match=rf"field 'shards\[1\]\.file': shard {name} is missing"):
        tc.TeacherCache(path)  # missing before opening: on open


# -- index validation: each mutation of a valid index.json -> the field its error must name ------------

def _put(key, value):
    return lambda index: {**index, key: value}


def _drop(key):
    return lambda index: {k: v for k, v in index.items() if k != key}


def _put_in_shard(s, key, value):
    def mutate(index):
        index["shards"][s][key] = value(index["shards"][s][key]) if callable(value) else value
        return index
    return mutate


def _drop_from_shard(s, key):
    def mutate(index):
        del index["shards"][s][key]
        return index
    return mutate


def _put_length(i, value):
    def mutate(index):
        index["seq_lengths"][i] = value
        return index
    return mutate


INDEX_MUTATIONS = [
    ("list", lambda index: [], "the index must be a JSON object, got list"),
    ("null", lambda index: None, "the index must be a JSON object, got NoneType"),
    ("format-missing", _drop("format"), "field 'format': is missing"),
    ("format-other", _put("format", "other-cache"), "field 'format': must be 'distillkit-teacher-cache'"),
    ("version-unknown", _put("version", 3), "field 'version': must be one of [1, 2]"),
    ("version-bool", _put("version", True), "field 'version': must be one of [1, 2]"),
    ("version-str", _put("version", "1"), "field 'version': must be one of [1, 2]"),
    ("mode-unknown", _put("mode", "topp"), "field 'mode': must be one of ['topk', 'sample'], got 'topp'"),
    ("mode-null", _put("mode", None), "field 'mode': must be one of"),
    ("sample-version-1", _put("mode", "sample"), "field 'version': must be >= 2 for mode 'sample', got 1"),
    ("sample-seed-missing", lambda index: {**_drop("seed")(index), "mode": "sample", "version": 2},
     "field 'seed': is missing"),
    ("seed-str", _put("seed", "0"), "field 'seed': must be an int >= 0"),
    ("seed-negative", _put("seed", -1), "field 'seed': must be an int >= 0"),
    ("incomplete", _put("complete", False), "field 'complete': the cache is incomplete"),
    ("incomplete-says-resume", _put("complete", False), "continue it with --resume"),
    ("complete-missing", _drop("complete"), "field 'complete': the cache is incomplete"),
    ("k-missing", _drop("k"), "field 'k': is missing"),
    ("k-zero", _put("k", 0), "field 'k': must be an int >= 1"),
    ("k-float", _put("k", 8.0), "field 'k': must be an int >= 1 and <= 1271 (vocab_size), got 8.0"),
    ("k-str", _put("k", "8"), "field 'k': must be an int >= 1 and <= 1271 (vocab_size), got '8'"),
    ("k-bool", _put("k", True), "field 'k': must be an int"),
    ("k-above-vocab", _put("k", VOCAB + 1), "field 'k': must be an int >= 1 and <= 1271 (vocab_size)"),
    ("vocab-missing", _drop("vocab_size"), "field 'vocab_size': is missing"),
    ("vocab-str", _put("vocab_size", "1271"), "field 'vocab_size': must be an int >= 1"),
    ("vocab-null", _put("vocab_size", None), "field 'vocab_size': must be an int >= 1"),
    ("vocab-zero", _put("vocab_size", 0), "field 'vocab_size': must be an int >= 1"),
    ("vocab-too-large", _put("vocab_size", 2**25), "field 'vocab_size': must be an int >= 1 and <= 16777216"),
    ("dtype-unknown", _put("logprob_dtype", "float32"), "field 'logprob_dtype': must be one of"),
    ("dtype-list", _put("logprob_dtype", ["float16"]), "field 'logprob_dtype': must be one of"),
    ("dtype-missing", _drop("logprob_dtype"), "field 'logprob_dtype': is missing"),
    ("id-bits", _put("id_bits", 12), "field 'id_bits': must be 11 for vocab_size 1271"),
    ("logprob-bits-str", _put("logprob_bits", "15"), "field 'logprob_bits': must be 15"),
    ("temperature-str", _put("temperature", "1.0"), "field 'temperature': must be a finite number > 0"),
    ("temperature-zero", _put("temperature", 0.0), "field 'temperature': must be a finite number > 0"),
    ("temperature-nan", _put("temperature", float("nan")), "field 'temperature': must be a finite number > 0"),
    ("temperature-bool", _put("temperature", True), "field 'temperature': must be a finite number > 0"),
    ("lengths-object", _put("seq_lengths", {"0": 3}), "field 'seq_lengths': must be a list"),
    ("length-negative", _put_length(3, -1), "field 'seq_lengths[3]': must be an int >= 0, got -1"),
    ("length-str", _put_length(3, "5"), "field 'seq_lengths[3]': must be an int >= 0, got '5'"),
    ("num-examples-off", lambda index: {**index, "num_examples": index["num_examples"] + 1},
     "field 'num_examples': must equal the length of seq_lengths"),
    ("num-examples-negative", _put("num_examples", -1), "field 'num_examples': must be an int >= 0"),
    ("num-tokens-off", lambda index: {**index, "num_tokens": index["num_tokens"] - 1},
     "field 'num_tokens': must equal the sum of seq_lengths"),
    ("num-tokens-float", lambda index: {**index, "num_tokens": float(index["num_tokens"])},
     "field 'num_tokens': must be an int >= 0"),
    ("shards-str", _put("shards", "shard-00000.safetensors"), "field 'shards': must be a list"),
    ("shards-empty", _put("shards", []), "field 'shards': the shards cover 0 examples"),
    ("shards-last-dropped", lambda index: {**index, "shards": index["shards"][:-1]},
     "field 'shards': the shards cover"),
    ("shard-str", lambda index: {**index, "shards": [index["shards"][0], "shard-00001.safetensors",
                                                     *index["shards"][2:]]},
     "field 'shards[1]': must be a JSON object"),
    ("file-missing", _drop_from_shard(1, "file"), "field 'shards[1].file': is missing"),
    ("file-parent", _put_in_shard(1, "file", "../shard-00001.safetensors"),
     "field 'shards[1].file': must be a plain file name"),
    ("file-absolute", _put_in_shard(1, "file", "/etc/passwd"), "field 'shards[1].file': must be a plain file name"),
    ("file-subfolder", _put_in_shard(1, "file", "sub/shard.safetensors"),
     "field 'shards[1].file': must be a plain file name"),
    ("file-backslash", _put_in_shard(1, "file", "..\\shard.safetensors"),
     "field 'shards[1].file': must be a plain file name"),
    ("file-dotdot", _put_in_shard(1, "file", ".."), "field 'shards[1].file': must be a plain file name"),
    ("file-empty", _put_in_shard(1, "file", ""), "field 'shards[1].file': must be a plain file name"),
    ("file-int", _put_in_shard(1, "file", 1), "field 'shards[1].file': must be a plain file name"),
    ("file-duplicate", _put_in_shard(1, "file", "shard-00000.safetensors"),
     "field 'shards[1].file': 'shard-00000.safetensors' is listed by an earlier shard too"),
    ("file-absent", _put_in_shard(1, "file", "shard-99999.safetensors"),
     "field 'shards[1].file': shard shard-99999.safetensors is missing"),
    ("sha256-short", _put_in_shard(1, "sha256", "abc123"), "field 'shards[1].sha256': must be 64 lowercase hex"),
    ("sha256-missing", _drop_from_shard(1, "sha256"), "field 'shards[1].sha256': is missing"),
    ("tokens-str", _put_in_shard(1, "num_tokens", str), "field 'shards[1].num_tokens': must be an int >= 0, got '"),
    ("tokens-off", _put_in_shard(1, "num_tokens", lambda n: n + 1), "field 'shards[1].num_tokens': must be "),
    ("tokens-negative", _put_in_shard(1, "num_tokens", -1), "field 'shards[1].num_tokens': must be an int >= 0"),
    ("first-example-off", _put_in_shard(1, "first_example", lambda n: n + 1),
     "field 'shards[1].first_example': must be "),
    ("first-example-missing", _drop_from_shard(1, "first_example"), "field 'shards[1].first_example': is missing"),
    ("shard-examples-too-many", _put_in_shard(1, "num_examples", lambda n: n + 100),
     "field 'shards[1].num_examples': must be an int >= 0 and <= "),
    ("shard-examples-negative", _put_in_shard(1, "num_examples", -1), "field 'shards[1].num_examples'"),
]


@pytest.mark.parametrize("mutate, field", [pytest.param(m, f, id=name) for name, m, f in INDEX_MUTATIONS])
def test_malformed_index_names_the_file_and_field(cache_dir, mutate, field):
    path, _ = cache_dir
    index_path = os.path.join(path, tc.INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    assert len(index["shards"]) >= 3
    with open(index_path, "w") as f:
        json.dump(mutate(index), f)
    for open_cache in (tc.TeacherCache, tc.bytes_per_token):
        with pytest.raises(tc.TeacherCacheError) as err:
            open_cache(path)
        assert str(err.value).startswith(f"{index_path}: ") and field in str(err.value)


@pytest.mark.parametrize("content, problem", [
    pytest.param(None, "is not valid JSON", id="truncated"),
    pytest.param(b"", "is not valid JSON", id="empty"),
    pytest.param(b"{'k': 8}", "is not valid JSON", id="python-literal"),
    pytest.param(b"\xff\xfe\x00garbage", "is not UTF-8", id="binary"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "is not valid JSON", id="deeply-nested"),
])
def test_unparseable_index(cache_dir, content, problem):
    path, _ = cache_dir
    index_path = os.path.join(path, tc.INDEX_FILE)
    with open(index_path, "rb") as f:
        data = f.read()
    with open(index_path, "wb") as f:
        f.write(data[:len(data) // 2] if content is None else content)
    with pytest.raises(tc.TeacherCacheError, match=re.escape(f"{index_path}: {problem}")):
        tc.TeacherCache(path)


def test_index_that_is_a_folder(tmp_path):
    os.mkdir(tmp_path / tc.INDEX_FILE)
    with pytest.raises(tc.TeacherCacheError, match="cannot be read"):
        tc.TeacherCache(str(tmp_path))


def test_valid_index_still_opens_with_the_same_data(cache_dir):
    """Key order and unknown extra keys are not errors; the data read is unchanged."""
    path, _ = cache_dir
    before = tc.TeacherCache(path)
    data = [before.example(i) for i in range(len(before))]
    index_path = os.path.join(path, tc.INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    index = {key: index[key] for key in reversed(list(index))}
    index["note"] = "written by a newer tool"
    with open(index_path, "w") as f:
        json.dump(index, f)
    for verify in (True, False):
        after = tc.TeacherCache(path, verify=verify)
        assert after.index == index and len(after) == len(data)
        for i, (ids, logprobs) in enumerate(data):
            got_ids, got_logprobs = after.example(i)
            assert torch.equal(got_ids, ids) and torch.equal(got_logprobs, logprobs)


# -- shard validation: a shard whose tensors disagree with the index, read after a valid open ----------

def _tensors_of(path, name):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, name))


def _drop_tensor(key):
    return lambda t, meta: ({k: v for k, v in t.items() if k != key}, meta)


def _off_by_one_lengths(t, meta):
    lengths = t["seq_lengths"].clone()
    lengths[0] += 1
    lengths[-1] -= 1
    return {**t, "seq_lengths": lengths}, meta


SHARD_MUTATIONS = [
    ("topk-missing", _drop_tensor("topk"), "tensor 'topk' is missing"),
    ("lengths-missing", _drop_tensor("seq_lengths"), "tensor 'seq_lengths' is missing"),
    ("topk-int64", lambda t, meta: ({**t, "topk": t["topk"].long()}, meta), "tensor 'topk' must be torch.int32"),
    ("topk-wrong-k", lambda t, meta: ({**t, "topk": t["topk"][:, :K - 1].contiguous()}, {**meta, "k": str(K - 1)}),
     f", {K}] (from the index), got torch.int32"),
    ("topk-fewer-tokens", lambda t, meta: ({**t, "topk": t["topk"][1:].contiguous()}, meta), "tensor 'topk' must be"),
    ("topk-flat", lambda t, meta: ({**t, "topk": t["topk"].reshape(-1)}, meta), "tensor 'topk' must be"),
    ("lengths-int32", lambda t, meta: ({**t, "seq_lengths": t["seq_lengths"].int()}, meta),
     "tensor 'seq_lengths' must be torch.int64"),
    ("lengths-extra", lambda t, meta: ({**t, "seq_lengths": torch.cat([t["seq_lengths"], t["seq_lengths"][:1]])},
                                       meta), "tensor 'seq_lengths' must be torch.int64"),
    ("lengths-values", _off_by_one_lengths, "tensor 'seq_lengths' differs from the index's seq_lengths["),
    ("metadata-k", lambda t, meta: (t, {**meta, "k": str(K + 1)}), f"metadata 'k' is '{K + 1}', the index says '{K}'"),
    ("metadata-first", lambda t, meta: (t, {**meta, "first_example": "0"}), "metadata 'first_example' is '0'"),
    ("metadata-missing", lambda t, meta: (t, None), "metadata 'format' is None"),
]


@pytest.mark.parametrize("mutate, problem", [pytest.param(m, p, id=name) for name, m, p in SHARD_MUTATIONS])
def test_shard_tensors_that_disagree_with_the_index(cache_dir, mutate, problem):
    from safetensors.torch import save

    path, _ = cache_dir
    name = _shard(path)
    first = _example_in(path, name)
    tensors, metadata = mutate(_tensors_of(path, name), {"format": tc.FORMAT, "k": str(K),
                                                          "first_example": str(first)})
    _replace_shard(path, name, save(tensors, metadata=metadata))
    cache = tc.TeacherCache(path)  # the index is fine: the shard is only checked when read
    with pytest.raises(tc.TeacherCacheError) as err:
        cache.example(first)
    assert str(err.value).startswith(f"{os.path.join(path, name)}: ") and problem in str(err.value)
    cache.example(0)  # other shards still read


@pytest.mark.parametrize("make_bytes", [
    pytest.param(lambda t: b"not a safetensors file", id="garbage"),
    pytest.param(lambda t: b"\xff" * 8 + b"{}", id="huge-header-length"),
    pytest.param(lambda t: _torch_save_bytes(t), id="torch-save-pickle"),
])
def test_unreadable_shard_is_refused_never_unpickled(cache_dir, make_bytes):
    path, _ = cache_dir
    name = _shard(path)
    _replace_shard(path, name, make_bytes(_tensors_of(path, name)))
    with pytest.raises(tc.TeacherCacheError, match=re.escape(f"{os.path.join(path, name)}: not a readable "
                                                             "safetensors file")):
        tc.TeacherCache(path).example(_example_in(path, name))


def _torch_save_bytes(tensors):
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


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
