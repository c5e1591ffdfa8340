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
  over the example's labelled positions. A row without a label (-100, a transfer row) has L_k = 0 for every
  teacher and weighs them equally.
- `"teacher_id"`: each row names its teacher in a `teacher_id` column (the teacher's index in the list, or in the
  dict's order): data from several domains, each with its own expert.
"""

import math

import torch
import torch.nn.functional as F

from .batch import TEACHER_ID
from .terms.base import Features
from .units import batch_size

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


class TeacherMixer:
    """Several teachers -> each example's weight of each teacher, and, for each response term, the combined teacher
    it reads: mixed at that term's own temperature and divergence (`Term.mixing()`), so `dkd` mixes at its T=4
    while `logit` mixes at its T=2.

    `mode`: a `teacher_combine` value, or "equal" (the peers of deep mutual learning); `weights`: the fixed weights
    of "weights" (`fixed_weights`)."""

    def __init__(self, mode: str = "weights", weights: torch.Tensor | None = None, shifts_labels: bool = False):
        self.mode, self.fixed, self.shifts_labels = mode, weights, shifts_labels

    def to(self, device) -> "TeacherMixer":
        if self.fixed is not None:
            self.fixed = self.fixed.to(device)
        return self

    def example_weights(self, logits: list, batch: dict, count: int) -> torch.Tensor:
        """Each example's weight of each teacher, `[B, K]`."""
        if self.mode == "equal":
            device = next((z.device for z in logits if z is not None), None)
            return torch.full((count, len(logits)), 1.0 / len(logits), device=device)
        if self.mode == "weights":
            return self.fixed.expand(count, -1)
        if self.mode == "teacher_id":
            ids = batch.get(TEACHER_ID)
            if not isinstance(ids, torch.Tensor):
                raise ValueError(
                    f"teacher_combine='teacher_id', but a batch came without a {TEACHER_ID!r} column; give each row "
                    "its teacher's index."
                )
            return routed_weights(ids, len(logits))
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor) or any(z is None for z in logits):
            raise ValueError(
                "teacher_combine='confidence' weighs each teacher by its cross-entropy on the labels: the batch needs "
                "`labels` and every teacher `logits`."
            )
        return confidence_weights(logits, labels, self.shifts_labels)

    def mix(self, term_set, teachers: dict, batch: dict):
        """({response term name: the combined teacher's `Features`}, the batch-mean weights `[K]`), or (None, None)
        with one teacher."""
        if not term_set.multi:
            return None, None
        logits = [side.logits for side in teachers.values()]
        weights = self.example_weights(logits, batch, batch_size(batch))
        mixed = {}
        if term_set.response:
            if any(z is None for z in logits):
                raise ValueError("A teacher returned no `logits`, which the response terms of several teachers mix.")
            kind = next(iter(teachers.values())).kind
            by_setting = {}
            for name in sorted(term_set.response):
                setting = term_set.terms[name].mixing()
                if setting not in by_setting:
                    z = mixed_logits(logits, weights, *setting)
                    by_setting[setting] = Features(MixedTeacherOutput(z), {}, kind)
                mixed[name] = by_setting[setting]
        return mixed, weights.mean(0)


def check_teacher_ids(datasets_by_name: dict, teachers: list[str]) -> None:
    """teacher_combine='teacher_id': each data set names a known teacher in every row."""
    import datasets

    for which, dataset in datasets_by_name.items():
        if not isinstance(dataset, datasets.Dataset):
            continue  # other data sets are checked batch by batch
        if TEACHER_ID not in dataset.column_names:
            raise ValueError(
                f"teacher_combine='teacher_id', but {which} has no {TEACHER_ID!r} column; add one holding each "
                f"row's teacher index (0..{len(teachers) - 1}: {teachers})."
            )
        ids = dataset.unique(TEACHER_ID)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(teachers)]
        if bad:
            raise ValueError(
                f"{which}[{TEACHER_ID!r}] holds {sorted(map(str, bad))[:5]}, which name no teacher; use the "
                f"teacher's index, 0..{len(teachers) - 1} for {teachers}."
            )
