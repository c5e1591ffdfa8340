"""Several teachers: how their knowledge is combined, and the combined teacher's logits.

`DistillationTrainer(teacher_model=[t1, t2])` or `{"bert": t1, "roberta": t2}` (models, Hub ids or paths) teaches
one student from several teachers. Every term that reads a teacher runs once per teacher (its own projections and
heads) and is logged per teacher as `distill/<term>/<teacher>`. The combined value `distill/<term>` is:

- for response terms (terms that read only the teachers' logits, such as `logit` and `dkd`): the term against one
  teacher whose distribution is the per-example weighted mixture of the teachers' distributions at the logit
  term's temperature, p = sum_k w_k softmax(z_k / T) (logits T log p; for `logit_loss="mse"`, the weighted mean of
  the logits). For forward KL the gradient of KL(p || q) with respect to the student equals that of the weighted
  sum of the per-teacher KLs, sum_k w_k KL(p_k || q), which is how CA-MKD writes its loss; the values differ by a
  constant. The per-teacher values are logged only (computed without gradients).
- for the other terms: sum_k w_k value_k, with w_k the batch mean of the per-example weights.

The weights (`teacher_combine`):
- `"weights"` (default): fixed, `teacher_weights` (equal if unset), normalised to sum to 1.
- `"confidence"`: per example, from each teacher's cross-entropy on the true label, L_k (Zhang, Chen & Wang,
  ICASSP 2022, "Confidence-Aware Multi-Teacher Knowledge Distillation", eq. 4): w_k = (1 - softmax_k(L)_k) / (K - 1),
  so the teacher that is right with more confidence weighs more. Needs labels; for token-level heads L_k is the mean
  over the example's labelled positions.
- `"teacher_id"`: each row names its teacher in a `teacher_id` column (the teacher's index in the list, or in the
  dict's order): data from several domains, each with its own expert.
"""

import math

import torch
import torch.nn.functional as F

COMBINE_MODES = ("weights", "confidence", "teacher_id")


def fixed_weights(weights, names: list[str]) -> torch.Tensor:
    """`teacher_weights` (a list in teacher order, a dict by name, or None for equal) as a normalised tensor."""
    if weights is None:
        return torch.full((len(names),), 1.0 / len(names))
    if isinstance(weights, dict):
        if set(weights) != set(names):
            raise ValueError(
                f"teacher_weights names {sorted(weights)}, but the teachers are {names}; give one weight per teacher."
            )
        values = [weights[name] for name in names]
    elif isinstance(weights, (list, tuple)):
        if len(weights) != len(names):
            raise ValueError(
                f"teacher_weights has {len(weights)} entries for {len(names)} teachers ({names}); give one per teacher."
            )
        values = list(weights)
    else:
        raise ValueError(f"teacher_weights must be a list or a dict of numbers, got {weights!r}.")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf]
    if bad or sum(values) <= 0:
        raise ValueError(f"teacher_weights must be finite numbers >= 0 with a positive sum, got {values}.")
    total = float(sum(values))
    return torch.tensor([v / total for v in values])


def confidence_weights(logits: list[torch.Tensor], labels: torch.Tensor, shifts_labels: bool) -> torch.Tensor:
    """CA-MKD's per-example weights `[B, K]` from each teacher's cross-entropy on the labels (module docstring)."""
    losses = []
    for z in logits:
        z, y = (z[:, :-1], labels[:, 1:]) if shifts_labels and z.dim() == 3 else (z, labels)
        ce = F.cross_entropy(z.float().flatten(0, -2), y.flatten(), ignore_index=-100, reduction="none")
        ce = ce.view(y.shape)
        if ce.dim() == 2:  # token-level: the mean over the example's labelled positions
            counted = y.ne(-100)
            ce = torch.where(counted, ce, torch.zeros((), device=ce.device)).sum(1) / counted.sum(1).clamp_min(1)
        losses.append(ce)
    losses = torch.stack(losses, dim=1)  # [B, K]
    return (1.0 - losses.softmax(dim=1)) / (losses.shape[1] - 1)


def routed_weights(teacher_id: torch.Tensor, num_teachers: int) -> torch.Tensor:
    """One-hot `[B, K]` weights from the batch's `teacher_id` column."""
    return F.one_hot(teacher_id.long().view(-1), num_teachers).float()


def mixed_logits(logits: list[torch.Tensor], weights: torch.Tensor, temperature: float, loss: str) -> torch.Tensor:
    """The combined teacher's logits: T log sum_k w_k softmax(z_k / T), or sum_k w_k z_k for the MSE loss.

    `weights` is `[B, K]`; logits `[B, C]` or `[B, L, V]`. Computed in float32 at least, as a logsumexp (stable).
    """
    stacked = torch.stack([z.float() for z in logits], dim=-1)  # [..., C, K]
    w = weights.to(stacked.device, stacked.dtype).view(weights.shape[0], *([1] * (stacked.dim() - 2)), -1)
    if loss == "mse":
        return (stacked * w).sum(-1)
    log_p = torch.log_softmax(stacked / temperature, dim=-2)
    # log sum_k w_k p_k; a zero weight gives log 0 = -inf, which logsumexp handles.
    return temperature * torch.logsumexp(log_p + torch.log(w), dim=-1)


class MixedTeacherOutput:
    """What response terms read of the combined teacher: its logits (no hidden states, attentions or modules)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
