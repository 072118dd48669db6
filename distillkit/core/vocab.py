"""Student/teacher vocabulary size mismatch.

Teacher and student often share a tokenizer but pad the output layer to
different sizes (32000 vs 32064, 151643 vs 151936). The policy says what the
losses do then:

- ``"error"``: raise a ValueError naming both sizes and the option.
- ``"truncate"``: the divergence compares the two distributions over the shared
  first ``min(Vs, Vt)`` ids: the extra ids get probability 0 on *both* sides
  (each side is renormalized over the shared ids), so nothing is infinite and
  nothing is NaN. The cross-entropy term keeps the student's full vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

VOCAB_POLICIES = ("error", "truncate")


class SharedVocab(NamedTuple):
    student: torch.Tensor  # [..., Vm] student logits for the divergence (a view)
    teacher: torch.Tensor  # [..., Vm] teacher logits for the divergence (a view)
    vocab_size: int  # Vm = min(Vs, Vt)
    truncated: bool  # False when the sizes already matched (student and teacher are the inputs)


def check_policy(policy: str) -> None:
    if policy not in VOCAB_POLICIES:
        raise ValueError(f"vocab_mismatch must be one of {', '.join(map(repr, VOCAB_POLICIES))}; got {policy!r}")


def shared_vocab_size(student_vocab: int, teacher_vocab: int, policy: str) -> int:
    """min(Vs, Vt) under "truncate"; raises under "error" when the sizes differ."""
    check_policy(policy)
    if student_vocab != teacher_vocab and policy == "error":
        raise ValueError(
            f"student vocabulary size {student_vocab} != teacher vocabulary size {teacher_vocab} "
            f"(vocab_mismatch='error'); pass vocab_mismatch='truncate' to compare the distributions over "
            f"the shared first {min(student_vocab, teacher_vocab)} ids")
    return min(student_vocab, teacher_vocab)


def truncate_to_shared_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             policy: str = "error") -> SharedVocab:
    """The student and teacher logits to hand to the divergence under `policy`.

    Returns views sliced to the first min(Vs, Vt) ids (no copy). The caller keeps the original
    ``student_logits`` for the cross-entropy term, which runs over the student's full vocabulary:

        shared = truncate_to_shared_vocab(s, t, vocab_mismatch)
        D  = divergence(shared.student, shared.teacher)   # gradient flows into s[..., :Vm]
        ce = cross_entropy(s, labels)                      # full student vocabulary
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    vm = shared_vocab_size(vs, vt, policy)
    if vs == vt:
        return SharedVocab(student_logits, teacher_logits, vm, False)
    return SharedVocab(student_logits[..., :vm], teacher_logits[..., :vm], vm, True)
