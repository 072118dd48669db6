"""distillkit.compat.trl.chunked_divergence_loss (TRL's DistillationTrainer loss) and its patch.

Checked against
- a float64 transcription of TRL's math written here, sharing no code with distillkit (always runs), and
- TRL's own `_chunked_divergence_loss` when TRL >= 1.16 imports (skipped otherwise). TRL computes in fp32
  whatever the input dtype (fp32 tiles, fp32 projections), so the comparison uses fp32 tolerances;
- a short real `trl.DistillationTrainer` run with and without the patch (tiny Llama models from configs, a
  WordLevel tokenizer built here: no downloads).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from distillkit.compat import trl_distillation
from distillkit.compat.trl import chunked_divergence_loss, patch_distillation_trainer, unpatch_distillation_trainer


def _trl_loss():
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except Exception as exc:  # not installed, too old, or a missing dependency of the trainer module
        return None, f"trl>=1.16 with trl.trainer.distillation_trainer._chunked_divergence_loss is needed ({exc})"
    return _chunked_divergence_loss, ""


TRL_LOSS, WHY = _trl_loss()
needs_trl = pytest.mark.skipif(TRL_LOSS is None, reason=WHY)

B, K, HS, HT, V = 3, 5, 8, 12, 37  # different hidden widths for the student and the teacher


def make_inputs(dtype=torch.float32, seed=0, biases=False):
    g = torch.Generator().manual_seed(seed)
    x = dict(student_hidden_states=torch.randn(B, K, HS, generator=g),
             teacher_hidden_states=torch.randn(B, K, HT, generator=g),
             student_lm_head_weight=torch.randn(V, HS, generator=g) * 0.7,
             teacher_lm_head_weight=torch.randn(V, HT, generator=g) * 0.7)
    if biases:
        x.update(student_lm_head_bias=torch.randn(V, generator=g), teacher_lm_head_bias=torch.randn(V, generator=g))
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0] = 0  # a fully-masked row
    mask[1, -2:] = 0
    return {k: v.to(dtype) for k, v in x.items()}, mask


STUDENT = ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")


def run(fn, inputs, mask, beta, **kwargs):
    """(loss, entropy_sum, n_valid, {student input: grad}) of fn on fresh leaves."""
    leaves = {k: v.detach().clone().requires_grad_(k in STUDENT) for k, v in inputs.items()}
    loss, entropy_sum, n_valid = fn(mask=mask, beta=beta, **leaves, **kwargs) if fn is ref_f64 else \
        fn(completion_mask=mask, beta=beta, **leaves, **kwargs)
    loss.backward()
    return loss.detach(), entropy_sum, n_valid, {k: leaves[k].grad for k in STUDENT if k in leaves}


# ----------------------------------------------------------------------------- float64 transcription

def ref_f64(student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight, mask, beta,
            num_items_in_batch=None, student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
            teacher_logit_scale=1.0, student_final_logit_softcapping=None, teacher_final_logit_softcapping=None,
            temperature=1.0):
    """TRL 1.16's _chunked_divergence_loss from its math, materialized, in float64."""
    def log_probs(h, w, b, scale, cap):
        z = h.double() @ w.double().T + (0 if b is None else b.double())
        z = z * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return torch.log_softmax(z / temperature, -1)

    log_s = log_probs(student_hidden_states, student_lm_head_weight, student_lm_head_bias, student_logit_scale,
                      student_final_logit_softcapping)
    log_t = log_probs(teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale,
                      teacher_final_logit_softcapping).detach()
    p_s, p_t = log_s.exp(), log_t.exp()
    if beta == 0:
        d = (p_t * (log_t - log_s)).sum(-1)
    elif beta == 1:
        d = (p_s * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.log((1 - beta) * p_s + beta * p_t)
        d = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    valid = (mask != 0).reshape(d.shape)
    n = int(valid.sum())
    total = torch.where(valid, d, 0.0).sum()
    loss = total / (max(n, 1) if num_items_in_batch is None else float(num_items_in_batch))
    entropy = -(p_s * log_s).sum(-1).detach()
    return loss, torch.where(valid, entropy, 0.0).sum(), torch.tensor(n)


CASES = {
    "plain": dict(),
    "biases": dict(biases=True),
    "student scale and softcap": dict(student_logit_scale=1.7, student_final_logit_softcapping=2.5),
    "teacher softcap, temperature": dict(teacher_final_logit_softcapping=3.0, teacher_logit_scale=0.6,
                                         temperature=0.7),
    "everything": dict(biases=True, student_logit_scale=0.8, teacher_logit_scale=1.3, temperature=2.0,
                       student_final_logit_softcapping=4.0, teacher_final_logit_softcapping=2.0),
}


def case(name):
    kwargs = dict(CASES[name])
    inputs, mask = make_inputs(biases=kwargs.pop("biases", False))
    return inputs, mask, kwargs


def assert_matches(got, want, rtol, atol):
    loss, entropy_sum, n_valid, grads = got
    w_loss, w_entropy, w_n, w_grads = want
    assert n_valid.dtype == torch.int64 and int(n_valid) == int(w_n)
    assert loss.dtype == entropy_sum.dtype == torch.float32
    torch.testing.assert_close(loss.double(), w_loss.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(entropy_sum.double(), w_entropy.double(), rtol=rtol, atol=atol)
    assert grads.keys() == w_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k].double().reshape(w_grads[k].shape), w_grads[k].double(), rtol=rtol,
                                   atol=atol, msg=k)


@pytest.mark.parametrize("reference", ["float64 transcription", pytest.param("trl", marks=needs_trl)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_reference(name, beta, reference):
    inputs, mask, kwargs = case(name)
    want_fn = ref_f64 if reference == "float64 transcription" else TRL_LOSS
    assert_matches(run(chunked_divergence_loss, inputs, mask, beta, **kwargs),
                   run(want_fn, inputs, mask, beta, **kwargs), rtol=1e-4, atol=1e-5)


@needs_trl
@pytest.mark.parametrize("num_items", [7, torch.tensor(7.0), torch.tensor(11)])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_num_items_in_batch(num_items, beta):
    inputs, mask = make_inputs(biases=True)
    got = run(chunked_divergence_loss, inputs, mask, beta, num_items_in_batch=num_items)
    assert_matches(got, run(TRL_LOSS, inputs, mask, beta, num_items_in_batch=num_items), rtol=1e-4, atol=1e-5)
    assert_matches(got, run(ref_f64, inputs, mask, beta, num_items_in_batch=num_items), rtol=1e-4, atol=1e-5)


@needs_trl
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fully_masked_batch(beta):
    inputs, mask = make_inputs(biases=True)
    got = run(chunked_divergence_loss, inputs, torch.zeros_like(mask), beta, temperature=1.5)
    assert_matches(got, run(TRL_LOSS, inputs, torch.zeros_like(mask), beta, temperature=1.5), rtol=0, atol=0)
    loss, entropy_sum, n_valid, grads = got
    assert loss == 0 and entropy_sum == 0 and n_valid == 0 and all(not g.any() for g in grads.values())


@needs_trl
def test_any_leading_shape_and_bool_mask():
    inputs, mask = make_inputs()
    flat = {k: v.reshape(-1, v.shape[-1]) if "hidden" in k else v for k, v in inputs.items()}
    want = run(TRL_LOSS, inputs, mask, 0.5)
    assert_matches(run(chunked_divergence_loss, flat, mask.reshape(-1).bool(), 0.5), want, rtol=1e-4, atol=1e-5)
    assert_matches(run(chunked_divergence_loss, inputs, mask.float(), 0.5), want, rtol=1e-4, atol=1e-5)


def unfused_bf16(student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight,
                 student_lm_head_bias, teacher_lm_head_bias, **kwargs):
    """An unfused bf16 model's loss: its logits F.linear(h, W, b) in bf16, then the math in float64."""
    eye = torch.eye(V)
    return ref_f64(F.linear(student_hidden_states, student_lm_head_weight, student_lm_head_bias),
                   F.linear(teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias), eye, eye, **kwargs)


@needs_trl
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bf16_error(beta, seed):
    """Errors against the float64 loss of the fp32 inputs (the error a bf16 run makes). Gradients: within a
    small factor of TRL's own error. Loss and entropy: distillkit's fused op rounds each chunk's logits to bf16
    (as an unfused bf16 model does), TRL keeps them fp32, so they are held to an unfused bf16 model's error
    instead (TRL's loss error is up to ~40x smaller here; ours stays under ~1e-3 relative)."""
    inputs, mask = make_inputs(seed=seed, biases=True)
    kwargs = dict(temperature=1.3, student_final_logit_softcapping=5.0)
    exact = run(ref_f64, inputs, mask, beta, **kwargs)
    bf16 = {k: v.bfloat16() for k, v in inputs.items()}
    ours, trl = (run(fn, bf16, mask, beta, **kwargs) for fn in (chunked_divergence_loss, TRL_LOSS))
    unfused = unfused_bf16(**bf16, mask=mask, beta=beta, **kwargs)

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    for i in (0, 1):  # loss, entropy_sum
        assert err(ours[i], exact[i]) <= 1.5 * err(unfused[i], exact[i]) + 1e-5
        assert err(ours[i], exact[i]) <= 2e-3 * exact[i].abs().item()
    for k in STUDENT:
        assert ours[3][k].dtype == torch.bfloat16
        assert err(ours[3][k], exact[3][k]) <= 4 * err(trl[3][k], exact[3][k]) + 1e-5, k


def test_argument_errors():
    inputs, mask = make_inputs()
    with pytest.raises(ValueError, match="beta"):
        chunked_divergence_loss(**inputs, completion_mask=mask, beta=1.5)
    with pytest.raises(ValueError, match="teacher_final_logit_softcapping"):
        chunked_divergence_loss(**inputs, completion_mask=mask, beta=0.5, teacher_final_logit_softcapping=0.0)
    with pytest.raises(ValueError, match="completion_mask"):
        chunked_divergence_loss(**inputs, completion_mask=mask[:, :2], beta=0.5)


def test_head_weight_of_another_dtype_is_cast():
    """An fp32 master weight with bf16 hidden states (mixed precision): cast once, as TRL does."""
    inputs, mask = make_inputs(biases=True)
    mixed = {k: v.bfloat16() if "hidden" in k else v for k, v in inputs.items()}
    same = {k: v.bfloat16() for k, v in inputs.items()}
    a, b = run(chunked_divergence_loss, mixed, mask, 0.5), run(chunked_divergence_loss, same, mask, 0.5)
    torch.testing.assert_close(a[0], b[0])
    assert a[3]["student_lm_head_weight"].dtype == torch.float32


# ----------------------------------------------------------------------------- the patch

@pytest.fixture
def trl_module():
    if TRL_LOSS is None:
        pytest.skip(WHY)
    import trl.trainer.distillation_trainer as module
    yield module
    unpatch_distillation_trainer()
    assert module._chunked_divergence_loss is TRL_LOSS


def test_patch_is_idempotent_and_undone_once(trl_module):
    from trl import DistillationTrainer
    assert patch_distillation_trainer() is None
    assert trl_module._chunked_divergence_loss is chunked_divergence_loss
    assert patch_distillation_trainer(DistillationTrainer) is DistillationTrainer
    patch_distillation_trainer(backend="torch")  # a third time, another backend
    patched = trl_module._chunked_divergence_loss
    assert patched is not chunked_divergence_loss and patched.__wrapped__ is chunked_divergence_loss
    inputs, mask = make_inputs()
    torch.testing.assert_close(patched(**inputs, completion_mask=mask, beta=0.5)[0],
                               chunked_divergence_loss(**inputs, completion_mask=mask, beta=0.5)[0])
    unpatch_distillation_trainer()
    assert trl_module._chunked_divergence_loss is TRL_LOSS
    unpatch_distillation_trainer()  # not patched: a no-op
    assert trl_module._chunked_divergence_loss is TRL_LOSS


def test_patch_rejects_other_targets_and_backends(trl_module):
    with pytest.raises(TypeError, match="trainer_or_class"):
        patch_distillation_trainer(object())
    with pytest.raises(ValueError, match="backend"):
        patch_distillation_trainer(backend="fast")
    assert trl_module._chunked_divergence_loss is TRL_LOSS


def test_patch_needs_trl_1_16(trl_module, monkeypatch):
    monkeypatch.delattr(trl_module, "_chunked_divergence_loss")
    with pytest.raises(ImportError, match=r"trl>=1\.16"):
        patch_distillation_trainer()
    monkeypatch.undo()
    monkeypatch.setattr(trl_distillation, "_TRL_MODULE", "trl.trainer.no_such_module")
    with pytest.raises(ImportError, match=r"trl>=1\.16"):
        patch_distillation_trainer()


# ----------------------------------------------------------------------------- a real DistillationTrainer

def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(seed, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    # initializer_range: peaked enough distributions that the student and the teacher differ visibly
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64, bos_token_id=None,
                      eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def train_losses(tmp_path, beta):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer
    prompts = [" ".join(f"w{(7 * i + j) % 61}" for j in range(3 + i % 3)) for i in range(8)]
    # On-policy: the student generates 4 tokens per prompt (no off-policy switch in TRL 1.16's trainer).
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                              max_completion_length=4, learning_rate=1e-2, logging_steps=1, report_to="none",
                              bf16=False, gradient_checkpointing=False, seed=0, save_strategy="no", beta=beta,
                              temperature=0.9, use_cpu=True, disable_tqdm=True)
    trainer = DistillationTrainer(model=tiny_llama(0, 16), teacher_model=tiny_llama(1, 24), args=args,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logs], [h["entropy"] for h in logs]


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_distillation_trainer_with_and_without_the_patch(trl_module, tmp_path, monkeypatch, beta):
    calls = []
    fused = trl_distillation.fused_linear_distill_loss
    monkeypatch.setattr(trl_distillation, "fused_linear_distill_loss",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    losses, entropies = train_losses(tmp_path / "trl", beta)
    assert not calls
    patch_distillation_trainer()
    patched_losses, patched_entropies = train_losses(tmp_path / "distillkit", beta)
    assert len(calls) >= 3 and len(patched_losses) == len(losses) == 3
    assert all(math.isfinite(x) and x > 1e-3 for x in losses)
    # Step 2 has completions that end early (masked positions); the loss divides by TRL's num_items_in_batch.
    assert patched_losses == pytest.approx(losses, rel=1e-5)
    assert patched_entropies == pytest.approx(entropies, rel=1e-5)
