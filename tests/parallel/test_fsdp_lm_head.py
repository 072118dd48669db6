"""DTensor LM heads (FSDP2 `fully_shard`, DTensor `Replicate`) in the logits-free losses, against one process.

Two gloo processes on CPU (spawned with torch.multiprocessing), each on half of a global batch, with the loss
normalized for data parallelism (each rank: its tokens' sum / the GLOBAL token count * world size, the gradient
then averaged over the ranks as FSDP2 and DDP do): the mean of the ranks' losses and EVERY gradient (backbone
and head, gathered with full_tensor) must equal one process's on the whole batch, in fp32.

- The model: an embedding, a linear layer and an lm_head nn.Linear(H, V) with V = 11 (uneven shards: 6 + 5),
  `fully_shard` per layer (the lm_head its own unit) and on the root. The loss takes `model.lm_head.weight`
  and `.bias` outside the head's forward: the sharded DTensor parameters (Shard(0)); the teacher's head is a
  DTensor too. Dense and top-k losses, reductions "mean" and "none" (the backward op's path), no_grad.
- A head built with distribute_tensor(..., [Replicate()]) (not reachable through fully_shard, which always
  shards), the backbone plain with its gradient averaged by hand (DDP's convention).
- The grad_placements decision, checked: a head gathered with `full_tensor(grad_placements=[Partial("avg")])`
  matches; `[Partial()]` (sum) is world_size times the gradient; the default (Replicate) leaves each rank its
  own local gradient.
- DTensor hidden states: a TypeError naming the argument.
- DistillationTrainer's logits-free path on a Hugging Face Llama under FSDP2 (fully_shard per decoder layer,
  then the root with reshard_after_forward=True, as accelerate's FSDP2 does; the teacher sharded the same way):
  its LM heads are DTensors when the loss runs, and the root's own layers (embedding, final norm) get their
  gradient although the loss never touches the root's output (the logits).
- On-policy distillation with a student sharded by FSDP2: a ValueError naming `loss.on_policy` with the default
  rollout (it would generate on each rank alone), none with a rollout of the user's.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import free_port, launch_env, spawn_and_wait, worker_process

from distillkit.core.fused_linear import fused_linear_distill_loss
from distillkit.sparse.fused_linear_topk import fused_linear_distill_loss_topk

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("needs torch.distributed with FSDP2 (fully_shard)", allow_module_level=True)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor  # noqa: E402

WORLD, BATCH, SEQ, HIDDEN, VOCAB = 2, 4, 5, 8, 11
TIMEOUT_S = 150
MAKE_TINY = str(Path(__file__).resolve().parents[2] / "examples" / "make_tiny.py")
LOSS = dict(divergence="jsd", temperature=2.0, kl_weight=0.5, ce_weight=0.5)


def _run(worker, *args):
    spawn_and_wait(worker, (WORLD, free_port(), *args), WORLD, TIMEOUT_S)


class Tiny(torch.nn.Module):
    def __init__(self, vocab=VOCAB, hidden=HIDDEN):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layer = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):
        return torch.tanh(self.layer(self.embed(ids)))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[0, :3] = -100  # the halves carry different token counts (7 and 9)
    labels[3, 1] = -100
    t_hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=g)
    t_weight, t_bias = torch.randn(VOCAB, HIDDEN, generator=g), torch.randn(VOCAB, generator=g)
    kl = torch.rand(BATCH, SEQ, generator=g)
    return ids, labels, t_hidden, t_weight, t_bias, kl


def _loss(kind, model, weight, bias, rows, t_weight, t_bias, scale):
    """The loss of batch rows `rows`, normalized by the global token count, times `scale`."""
    ids, labels, t_hidden, plain_t_weight, plain_t_bias, kl = _batch()
    n = (labels != -100).sum()
    hidden = model(ids[rows])
    if kind == "topk":  # the teacher's top-4 log-probabilities
        with torch.no_grad():
            teacher = torch.nn.functional.linear(t_hidden, plain_t_weight, plain_t_bias).log_softmax(-1).topk(4, -1)
        loss = fused_linear_distill_loss_topk(hidden, weight, teacher.indices[rows], teacher.values[rows],
                                              labels[rows], student_bias=bias, ce_weight=0.5, temperature=2.0,
                                              normalizer=n)
    elif kind == "none":  # per-token loss and weights: the backward recomputes the chunks
        per_token = fused_linear_distill_loss(hidden, weight, t_hidden[rows], t_weight, labels[rows],
                                              student_bias=bias, teacher_bias=t_bias, reduction="none",
                                              **dict(LOSS, kl_weight=kl[rows]))
        loss = per_token.sum() / n
    else:
        loss = fused_linear_distill_loss(hidden, weight, t_hidden[rows], t_weight, labels[rows], student_bias=bias,
                                         teacher_bias=t_bias, normalizer=n, **LOSS)
    return loss * scale


def _reference(kind):
    torch.manual_seed(0)
    model = Tiny()
    _, _, _, t_weight, t_bias, _ = _batch()
    loss = _loss(kind, model, model.lm_head.weight, model.lm_head.bias, slice(None), t_weight, t_bias, 1.0)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _full(grad):
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def _compare_loss(failures, context, loss, ref_loss):
    """The mean of the ranks' losses against the one-process loss."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    if not torch.allclose(total / WORLD, ref_loss, rtol=1e-6, atol=0):
        failures.append(f"{context}: loss {float(total / WORLD)} != {float(ref_loss)}")


def _compare(failures, context, loss, model, reference):
    ref_loss, ref_grads = reference
    _compare_loss(failures, context, loss, ref_loss)
    for name, p in model.named_parameters():
        if name.startswith("lm_head") and not isinstance(p, DTensor):
            failures.append(f"{context}: {name} is a {type(p).__name__}, not a DTensor")
        if p.grad is None:
            failures.append(f"{context}: {name} has no gradient")
            continue
        got, want = _full(p.grad), ref_grads[name]
        scale = float(want.abs().max())
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6 * scale):
            failures.append(f"{context}: {name} gradient off by {float((got - want).abs().max()):.2e} "
                            f"(max |grad| {scale:.2e})")


def _fsdp_model(mesh):
    torch.manual_seed(0)
    model = Tiny()
    fully_shard(model.layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)  # its own unit: its forward never runs, the parameters stay sharded
    fully_shard(model, mesh=mesh)
    return model


def _core_worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with worker_process():
        mesh = init_device_mesh("cpu", (world,))
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        _, _, _, t_weight, t_bias, _ = _batch()
        t_weight_d, t_bias_d = (distribute_tensor(t, mesh, [Shard(0)]) for t in (t_weight, t_bias))
        failures = []
        for kind in ("dense", "topk", "none"):
            reference = _reference(kind)
            model = _fsdp_model(mesh)
            assert model.lm_head.weight.placements == (Shard(0),)
            assert model.lm_head.weight.to_local().shape[0] == (6, 5)[rank]
            loss = _loss(kind, model, model.lm_head.weight, model.lm_head.bias, rows, t_weight_d, t_bias_d, world)
            loss.backward()
            _compare(failures, f"fully_shard, {kind}", loss, model, reference)

            # A head replicated as a DTensor, the backbone plain (its gradient averaged by hand, as DDP would).
            torch.manual_seed(0)
            model = Tiny()
            for name in ("weight", "bias"):
                plain = getattr(model.lm_head, name).detach()
                setattr(model.lm_head, name, torch.nn.Parameter(distribute_tensor(plain, mesh, [Replicate()])))
            loss = _loss(kind, model, model.lm_head.weight, model.lm_head.bias, rows, t_weight, t_bias, world)
            loss.backward()
            for name, p in model.named_parameters():
                if not isinstance(p, DTensor):
                    dist.all_reduce(p.grad)
                    p.grad /= world
                elif p.grad.placements != (Replicate(),):
                    failures.append(f"replicate, {kind}: the {name} gradient is {p.grad.placements}")
            _compare(failures, f"Replicate head, {kind}", loss, model, reference)

        # The gradient placements: avg is FSDP2's convention, sum double counts, the default does not reduce.
        reference = _reference("dense")
        head_grad = reference[1]["lm_head.weight"]
        for placements, factor in (([Partial("avg")], 1.0), ([Partial()], world), (None, None)):
            model = _fsdp_model(mesh)
            weight = model.lm_head.weight.full_tensor(grad_placements=placements)
            bias = model.lm_head.bias.full_tensor(grad_placements=placements)
            _loss("dense", model, weight, bias, rows, t_weight, t_bias, world).backward()
            got = _full(model.lm_head.weight.grad)
            if factor is not None and not torch.allclose(got, factor * head_grad, rtol=1e-5, atol=1e-7):
                failures.append(f"grad_placements={placements}: not {factor} x the gradient")
            if factor is None and torch.allclose(got, head_grad, rtol=1e-2, atol=1e-3):
                failures.append("the default grad_placements should not reduce across the ranks")

        # no_grad: the same loss; nothing recorded.
        model = _fsdp_model(mesh)
        with torch.no_grad():
            loss = _loss("dense", model, model.lm_head.weight, model.lm_head.bias, rows, t_weight_d, t_bias_d, world)
        if loss.requires_grad:
            failures.append("no_grad: the loss requires grad")
        _compare_loss(failures, "no_grad", loss, reference[0])

        # A DTensor hidden state: a clear error (on every rank, before any collective).
        hidden = distribute_tensor(torch.randn(BATCH, SEQ, HIDDEN), mesh, [Shard(0)])
        with pytest.raises(TypeError, match="student_hidden is a DTensor"):
            fused_linear_distill_loss(hidden, model.lm_head.weight, None, None, _batch()[1], kl_weight=0.0,
                                      ce_weight=1.0)
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)


def test_dtensor_lm_head_matches_one_process():
    _run(_core_worker)


# -- DistillationTrainer's logits-free path under FSDP2 --------------------------------------------

def _trainer_step(workspace, out, rows, mesh=None):
    """(loss, {name: full gradient}, path, head types) of one compute_loss + backward on examples `rows`, with
    num_items_in_batch counted over examples 0-3; the models sharded with FSDP2 when mesh is given."""
    import transformers
    from distillkit.data import DistillationCollator
    from distillkit.training.trainer import DistillationConfig, DistillationTrainer
    tok = workspace["tokenizer"]
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    make = workspace["make_model"]
    student, teacher = make("llama", len(tok), seed=2, **ids), make("llama", len(tok), seed=1, hidden=48, ffn=96, **ids)
    if mesh is not None:
        # The student's head its own unit (its forward never runs: it stays sharded), the teacher's in the root
        # (resharded after forward): both are DTensors when the loss runs.
        fully_shard(student.lm_head, mesh=mesh)
        for model in (student, teacher):
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh, reshard_after_forward=True)  # accelerate's FSDP2 default
    args = transformers.TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True,
                                          dataloader_pin_memory=False)
    config = DistillationConfig(divergence="jsd", temperature=2.0, use_logits_free=True,
                                span_weights={"reason": (1.0, 0.0), "action": (0.5, 1.0), "answer": (1.0, 0.2)})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, distill_config=config,
                                  train_dataset=workspace["examples"], processing_class=tok)
    collate = DistillationCollator.from_tokenizer(tok)
    n = (collate(workspace["examples"][:4])["labels"][:, 1:] != -100).sum()
    student.train()
    loss = trainer.compute_loss(student, collate([workspace["examples"][i] for i in rows]), num_items_in_batch=n)
    heads = (type(student.lm_head.weight).__name__, type(teacher.lm_head.weight).__name__)
    loss.backward()
    grads = {name: _full(p.grad).clone() for name, p in student.named_parameters()}
    return loss.detach(), grads, trainer.last_path, heads


def _make_tiny(path):
    """examples/make_tiny.py as a module (tiny tokenizer, trajectories and Llama configs; no download)."""
    spec = importlib.util.spec_from_file_location("make_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _workspace_paths(tmp_path, n_trajectories: int) -> dict:
    """examples/make_tiny.py's workspace (tokenizer, trajectories) under tmp_path, for the workers to load."""
    for module in ("transformers", "tokenizers", "accelerate"):
        pytest.importorskip(module)
    paths = {"make_tiny": MAKE_TINY}
    paths.update(_make_tiny(MAKE_TINY).build_workspace(tmp_path / "tiny", n_trajectories=n_trajectories,
                                                       models=False))
    return paths


def _load_workspace(paths):
    import transformers
    from distillkit.data import TrajectoryTokenizer, load_trajectories
    make_tiny = _make_tiny(paths["make_tiny"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    examples = TrajectoryTokenizer(tokenizer, max_length=128).tokenize_all(load_trajectories(paths["data"]))
    return {"tokenizer": tokenizer, "examples": examples, "make_model": make_tiny.make_model}


def _trainer_worker(rank, world, port, paths, out_dir):
    launch_env(rank, world, port)
    with worker_process():
        mesh = init_device_mesh("cpu", (world,))  # initializes the gloo group from the environment
        workspace = _load_workspace(paths)
        loss, grads, path, heads = _trainer_step(workspace, os.path.join(out_dir, f"rank{rank}"),
                                                 [2 * rank, 2 * rank + 1], mesh)
        total = loss.clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total / world, "grads": grads, "path": path, "heads": heads},
                       os.path.join(out_dir, "fsdp.pt"))


def test_trainer_logits_free_path_under_fsdp2(tmp_path):
    paths = _workspace_paths(tmp_path, n_trajectories=8)

    _run(_trainer_worker, paths, str(tmp_path))
    two = torch.load(tmp_path / "fsdp.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_loss, one_grads, one_path, _ = _trainer_step(_load_workspace(paths), tmp_path / "one", [0, 1, 2, 3])
    finally:
        torch.set_num_threads(threads)
    assert one_path == two["path"] == "logits_free"
    assert two["heads"] == ("DTensor", "DTensor")  # resharded after forward: the loss gathered them
    torch.testing.assert_close(two["loss"], one_loss, rtol=1e-6, atol=0)
    assert set(two["grads"]) == set(one_grads)
    for name, want in one_grads.items():
        scale = float(want.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(two["grads"][name], want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


# -- on-policy distillation refuses sharded parameters with its default rollout ---------------------

def _on_policy_worker(rank, world, port, paths, out_dir):
    launch_env(rank, world, port)
    import transformers

    from distillkit.training.trainer import DistillationConfig, DistillationTrainer
    with worker_process():
        mesh = init_device_mesh("cpu", (world,))
        workspace = _load_workspace(paths)
        tok = workspace["tokenizer"]
        ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        student = workspace["make_model"]("llama", len(tok), seed=2, **ids)
        teacher = workspace["make_model"]("llama", len(tok), seed=1, **ids)
        for layer in student.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(student, mesh=mesh)
        args = transformers.TrainingArguments(output_dir=os.path.join(out_dir, f"rank{rank}"), use_cpu=True,
                                              report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
        config = DistillationConfig(divergence="reverse_kl", on_policy={"fraction": 0.5, "max_new_tokens": 4})
        build = dict(model=student, teacher_model=teacher, args=args, distill_config=config,
                     train_dataset=workspace["examples"], processing_class=tok)
        with pytest.raises(ValueError, match=r"^loss\.on_policy: .*sharded across processes here \(FSDP2 / DTensor"):
            DistillationTrainer(**build)
        trainer = DistillationTrainer(**build, on_policy_rollout=lambda model, prompts, cfg: [])  # the user's call
        assert trainer.on_policy is not None
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()


def test_on_policy_refuses_fsdp2_sharded_students_with_its_default_rollout(tmp_path):
    paths = _workspace_paths(tmp_path, n_trajectories=4)
    _run(_on_policy_worker, paths, str(tmp_path))
    assert all((tmp_path / f"ok{rank}").exists() for rank in range(WORLD))
