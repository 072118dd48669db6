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
    assert "goals (reported as measured)" in printed
    report = json.loads((out / "report.json").read_text())
    for name in ("teacher", "distilled", "sft", "tiny"):
        result = report["results"][name]
        assert 0.0 <= result["success"] <= 1.0 and set(result["success_by_steps"]) == {"1", "2", "3", "4"}
        assert "ece" in result["calibration"]
    assert report["parameters"]["distilled"] * 4 <= report["parameters"]["teacher"]
    assert report["parameters"]["distilled"] == report["parameters"]["sft"]
    assert {p["threshold"] for p in report["fallback"]["distilled"]["test_curve"]} == {0.0, 0.5, 1.01}
    assert len(report["cascade"]["thresholds"]) == 2
    assert set(report["goals"]) == {"distilled_retains_90pct_of_teacher", "distilled_beats_sft",
                                    "fallback_98pct_of_teacher_at_most_20pct_escalation"}
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
    jobs = [M.TrainJob(name, M.ModelSize(8, 1, 2, 16), vocab, tuple(w.items()), distill, 5, 2, 1e-2, seed=3)
            for name, w, distill in (("kd", M.DISTILL_WEIGHTS, True), ("sft", M.SFT_WEIGHTS, False))]
    forked = M.run_jobs(jobs, examples, workers=2, progress=False)
    inline = M.run_jobs(jobs, examples, workers=1, progress=False)
    for name in ("kd", "sft"):
        assert forked[name][1] == inline[name][1]  # the same losses, step by step
        for a, b in zip(forked[name][0].state_dict().values(), inline[name][0].state_dict().values()):
            assert torch.equal(a, b)
