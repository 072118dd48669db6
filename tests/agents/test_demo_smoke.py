"""`distillkit demo --smoke`: the whole pipeline end to end in seconds (the numbers mean nothing)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")


def test_demo_smoke(tmp_path, capsys):
    from distillkit.demo.cli import main

    out = tmp_path / "demo"
    assert main(["--smoke", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "student, distilled" in printed and "SFT baseline" in printed and "cascade" in printed
    assert "student, offline top-k (K=16)" in printed and "teacher cache of" in printed
    assert "student, on-policy KD" in printed and "OOD" in printed
    assert "goals (reported as measured)" in printed
    report = json.loads((out / "report.json").read_text())
    for name in ("teacher", "distilled", "offline_topk", "on_policy", "sft", "tiny"):
        result = report["results"][name]
        assert 0.0 <= result["success"] <= 1.0 and set(result["success_by_steps"]) == {"1", "2", "3", "4"}
        assert "ece" in result["calibration"]
    for name in ("teacher", "distilled", "offline_topk", "on_policy", "sft", "tiny", "distilled_fallback",
                 "sft_fallback", "cascade"):  # every row of the table
        result = report["results"][name]
        assert 0.0 <= result["ood_success"] <= 1.0 and set(result["ood_success_by_steps"]) == {"5", "6"}
        assert result["relative_cost"] > 0 and result["flops_per_task"] > 0
    assert report["results"]["teacher"]["relative_cost"] == 1.0
    assert report["results"]["distilled"]["relative_cost"] < 1.0  # a quarter of the parameters at most
    assert set(report["results"]["on_policy"]) == set(report["results"]["distilled"])
    assert report["data"]["ood_tasks"] == 8
    assert report["parameters"]["distilled"] * 4 <= report["parameters"]["teacher"]
    assert report["parameters"]["distilled"] == report["parameters"]["sft"] == report["parameters"]["offline_topk"]
    assert set(report["results"]["offline_topk"]) == set(report["results"]["distilled"]) | {"cache"}
    cache = report["results"]["offline_topk"]["cache"]
    assert cache["k"] == 16 and cache["mode"] == "topk" and cache["tokens"] > 0
    files = [f for f in (out / "teacher_cache").iterdir() if f.suffix == ".safetensors"]
    assert cache["bytes"] == sum(f.stat().st_size for f in files)
    assert {p["threshold"] for p in report["fallback"]["distilled"]["test_curve"]} == {0.0, 0.5, 1.01}
    assert len(report["cascade"]["thresholds"]) == 2
    assert set(report["goals"]) == {"distilled_retains_90pct_of_teacher", "distilled_beats_sft",
                                    "fallback_98pct_of_teacher_at_most_20pct_escalation",
                                    "offline_topk_reaches_95pct_of_distilled"}
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "teacher_trajectories.jsonl").exists() and (out / "finetune.jsonl").exists()
    assert report["wall_time_s"] > 0 and report["timings_s"]  # recorded (timings belong to the demo, not a test)


def test_parallel_training_matches_sequential():
    import torch

    from distillkit.demo import models as M

    tok = M.train_tokenizer(["Q: What is 2+3?\n", "T: Compute 2+3.\n", 'A: calc {"expr":"2+3"}\n', "O: 5\n",
                             "F: 5\n"], vocab_size=64)
    traj = {"user": "What is 2+3?", "steps": [{"reasoning": "Compute 2+3.", "tool_call": {
        "name": "calc", "arguments": {"expr": "2+3"}}, "tool_result": "5"}], "answer": "5"}
    examples = M.encode_examples(tok, [traj] * 4)
    vocab = tok.get_vocab_size()
    teacher = M.make_model(vocab, M.ModelSize(16, 1, 2, 32), seed=0)
    M.attach_teacher_logits(teacher, examples)
    for ex in examples:  # a top-4 "cache" in memory
        logprobs, ids = torch.log_softmax(ex.teacher_logits, -1).topk(4, dim=-1)
        ex.teacher_topk = (ids, logprobs)
    jobs = [M.TrainJob(name, M.ModelSize(8, 1, 2, 16), vocab, tuple(w.items()), source, 5, 2, 1e-2, seed=3)
            for name, w, source in (("kd", M.DISTILL_WEIGHTS, "logits"), ("topk", M.DISTILL_WEIGHTS, "topk"),
                                    ("sft", M.SFT_WEIGHTS, "none"))]
    forked = M.run_jobs(jobs, examples, workers=3, progress=False)
    inline = M.run_jobs(jobs, examples, workers=1, progress=False)
    for name in ("kd", "topk", "sft"):
        assert forked[name][1] == inline[name][1]  # the same losses, step by step
        for a, b in zip(forked[name][0].state_dict().values(), inline[name][0].state_dict().values()):
            assert torch.equal(a, b)


def test_topk_span_loss_with_the_whole_vocabulary_is_the_dense_span_loss():
    """With K = V cached ids ("renormalize" then restricts nothing) the offline student's loss is the dense one."""
    import torch

    from distillkit.core.modules import SpanDistillationLoss
    from distillkit.demo import models as M

    torch.manual_seed(0)
    batch, width, vocab = 3, 7, 11
    student = torch.randn(batch, width, vocab, dtype=torch.float64) * 3
    teacher = torch.randn(batch, width, vocab, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (batch, width))
    spans = torch.randint(-1, 5, (batch, width))
    labels[spans < 0] = -100
    logprobs, ids = torch.log_softmax(teacher, -1).topk(vocab, dim=-1)
    grads = []
    for loss_fn, targets in ((SpanDistillationLoss(M.DISTILL_WEIGHTS), teacher),
                             (M.TopKSpanLoss(M.DISTILL_WEIGHTS), (ids, logprobs))):
        s = student.clone().requires_grad_()
        loss = loss_fn(s, targets, labels, spans)
        loss.backward()
        grads.append((loss.detach(), s.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-6)


def test_batch_parts_on_threads_compute_the_same_steps():
    """train(batch_parts=2): each half's loss over the whole batch's tokens, gradients added in a fixed order:
    the same training up to rounding, and the same numbers on every run."""
    from distillkit.core.modules import SpanDistillationLoss
    from distillkit.demo import models as M

    tok = M.train_tokenizer(["Q: What is 2+3?\n", "T: Compute 2+3.\n", 'A: calc {"expr":"2+3"}\n', "O: 5\n",
                             "F: 5\n"], vocab_size=64)
    trajs = [{"user": f"What is {a}+3?", "steps": [{"reasoning": f"Compute {a}+3.", "tool_call": {
        "name": "calc", "arguments": {"expr": f"{a}+3"}}, "tool_result": str(a + 3)}], "answer": str(a + 3)}
        for a in range(1, 8)]
    examples = M.encode_examples(tok, trajs)
    runs = {}
    for parts in (1, 2, 3, 2):
        model = M.make_model(tok.get_vocab_size(), M.ModelSize(16, 1, 2, 32), seed=0)
        losses = M.train(model, examples, steps=6, batch_size=5, lr=1e-2, loss_fn=SpanDistillationLoss(M.SFT_WEIGHTS),
                         batch_parts=parts)
        if parts in runs:
            assert losses == runs[parts]  # deterministic
        runs[parts] = losses
    assert runs[1][0] > 0
    for parts in (2, 3):
        assert runs[parts] == pytest.approx(runs[1], rel=1e-4)
