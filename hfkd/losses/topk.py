"""Logit losses against a teacher distribution kept as its top-k classes plus the rest of its probability mass.

A cached teacher stores, per position, the ids of its k most likely classes at temperature T and k + 1
log-probabilities: those k classes and, last, everything else as one bucket. The student's distribution is folded
the same way (its probabilities of the teacher's k classes, and the sum of all others), and the divergence is taken
between these two (k + 1)-way distributions. It is exact for the k classes and treats the tail as one class, so it
never exceeds the full divergence by much when the teacher's tail is flat; benchmarks/ measures the gap.
"""

import torch
import torch.nn.functional as F

from ._registry import LOGIT_LOSSES

# Divergences between distributions: they stay meaningful on the folded (k + 1)-way distributions.
TOPK_LOSSES = ("kl", "reverse_kl", "jsd")


def fold_student(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student log-probabilities at temperature T of the teacher's top-k ids, plus the rest as a last bucket."""
    log_p = F.log_softmax(
        student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)) / temperature, -1
    )
    ids = topk_ids.long()
    top = log_p.gather(-1, ids)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def fold_teacher(teacher_logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k ids, k + 1 log-probabilities at temperature T) of full teacher logits: what a cache stores."""
    log_p = F.log_softmax(
        teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)) / temperature, -1
    )
    top, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return ids, torch.cat([top, rest], dim=-1)


def topk_logit_loss(
    name: str,
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    *,
    temperature: float,
    beta: float = 0.5,
) -> torch.Tensor:
    """The registered loss `name` between folded student and teacher distributions, times T^2, per position."""
    if name not in TOPK_LOSSES:
        raise ValueError(
            f"logit_loss={name!r} needs the teacher's full logits, but the cache keeps only its top-k; use one of "
            f"{list(TOPK_LOSSES)} or rebuild the cache with top_k=0 (full logits)."
        )
    student = fold_student(student_logits, topk_ids, temperature)
    # Both inputs are normalised log-probabilities already: at temperature 1 the loss's own softmax keeps them.
    teacher = teacher_log_probs.to(student.dtype)
    return LOGIT_LOSSES[name](student, teacher, temperature=1.0, beta=beta) * temperature**2
