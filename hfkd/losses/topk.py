"""Logit losses against a teacher distribution kept as its top-k classes plus the rest of its probability mass.

A cached teacher stores, per position, the ids of its k most likely classes at temperature T and k + 1
log-probabilities: those k classes and, last, everything else as one bucket of mass R. What the teacher did outside
the k is lost; `tail` says what the loss assumes there:

- 'folded' (what training uses): the student's distribution is folded the same way (its probabilities of the
  teacher's k classes, and the sum of all others) and the divergence is taken between the two (k + 1)-way
  distributions. Inside the tail the student keeps its own shape: only its tail's total mass is pulled to R. A
  student that equals its teacher has zero loss and gradient, so the teacher is still the optimum.
- 'uniform' (measured, not trained with): the teacher's tail is taken to be R spread evenly over the V - k other
  classes, and the divergence is taken over all V classes. Its gradient with respect to the logits is closer to the
  full logits' one at T=2 (cosine 0.990 against 0.945 on SmolLM2 with k=48), but its gradient with respect to the
  student's parameters, which training follows, is not reliably closer (0.948 against 0.953 for a 6-layer student
  at T=2, 0.753 against 0.899 for a 24-layer one) and it pulls a student equal to its teacher towards a flat tail.
  benchmarks/README.md ("The teacher cache's size against its gradient") has the table.

Both are exact when the teacher's own tail is even (tested). They differ most at high temperature, where the k
classes hold little of the teacher's mass (at T=2, SmolLM2's top 48 hold 18% of it).
"""

import math

import torch
import torch.nn.functional as F

from ._registry import LOGIT_LOSSES

# Divergences between distributions: they stay meaningful on the folded (k + 1)-way distributions.
TOPK_LOSSES = ("kl", "reverse_kl", "jsd")
TAILS = ("folded", "uniform")


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


def spread_teacher(topk_ids: torch.Tensor, teacher_log_probs: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher's log-probabilities over all `vocab` classes with its tail mass R spread evenly: log(R / (V - k))
    outside the k ids, the cached values on them. `[..., V]`, in the log-probabilities' dtype."""
    k = topk_ids.shape[-1]
    log_rest = teacher_log_probs[..., -1:] - math.log(vocab - k)
    full = log_rest.expand(*teacher_log_probs.shape[:-1], vocab).clone()
    return full.scatter_(-1, topk_ids.long(), teacher_log_probs[..., :-1])


def topk_logit_loss(
    name: str,
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    *,
    temperature: float,
    beta: float = 0.5,
    tail: str = "folded",
) -> torch.Tensor:
    """The registered loss `name` between the student and the cached teacher, times T^2, per position: between the
    folded (k + 1)-way distributions (`tail='folded'`) or over all classes with the teacher's tail spread evenly
    (`tail='uniform'`)."""
    if name not in TOPK_LOSSES:
        raise ValueError(
            f"logit_loss={name!r} needs the teacher's full logits, but the cache keeps only its top-k; use one of "
            f"{list(TOPK_LOSSES)} or rebuild the cache with top_k=0 (full logits)."
        )
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {list(TAILS)}, got {tail!r}.")
    vocab = student_logits.shape[-1]
    if tail == "uniform" and vocab > topk_ids.shape[-1]:  # with no class outside the k both tails are the same
        student = F.log_softmax(
            student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)) / temperature, -1
        )
        teacher = spread_teacher(topk_ids, teacher_log_probs.to(student.dtype), vocab)
    else:
        student = fold_student(student_logits, topk_ids, temperature)
        teacher = teacher_log_probs.to(student.dtype)
    # Both inputs are normalised log-probabilities already: at temperature 1 the loss's own softmax keeps them.
    return LOGIT_LOSSES[name](student, teacher, temperature=1.0, beta=beta) * temperature**2
