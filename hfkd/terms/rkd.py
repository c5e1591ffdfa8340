"""Relational KD (Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019).

RKD transfers the structure of a micro-batch of b examples rather than each example's output: with e_i the pooled
embedding of example i (student s_i, teacher t_i; one row per example, flattened), it compares

- distances (eq. 4-5 of the paper): psi_D(e_i, e_j) = ||e_i - e_j||_2 / mu, where mu is the mean of the non-zero
  pairwise distances of that model's batch (mu is taken separately for student and teacher, so a student whose
  embeddings are the teacher's times any c > 0 has no distance loss). Pairs i != j (every ordered pair; both orders
  give the same value);

      L_RKD-D = mean over i != j of l_delta(psi_D(t_i, t_j), psi_D(s_i, s_j));

- angles (eq. 6-7): psi_A(e_i, e_j, e_k) = cos of the angle at e_j = <(e_i - e_j) / ||e_i - e_j||,
  (e_k - e_j) / ||e_k - e_j||>, over the triplets of pairwise distinct i, j, k;

      L_RKD-A = mean over distinct (i, j, k) of l_delta(psi_A(t_i, t_j, t_k), psi_A(s_i, s_j, s_k));

where l_delta is the Huber loss with threshold 1 (PyTorch's smooth L1 with beta = 1): 0.5 x^2 for |x| <= 1, else
|x| - 0.5. The value of the term is

    lambda_D * L_RKD-D + lambda_A * L_RKD-A

with the defaults lambda_D = 25 (`distance_weight`) and lambda_A = 50 (`angle_weight`), the values of the paper's
classification experiments, where RKD is added to the task loss (the authors' metric-learning example uses 1 and 2,
as does torchdistill's ImageNet config next to a KD term). The lambdas are inside the term, so its recommended
`weight` in `terms` is 1. Student and teacher widths may differ: only distances and angles within each model are
compared, so no projection is needed.

Reductions, and where they differ from the authors' code (lenscloth/RKD, copied by torchdistill and RepDistiller):
the means here run over the b (b - 1) pairs i != j and the b (b - 1) (b - 2) triplets of distinct examples. The
authors' code averages over all b^2 entries of the distance matrix (its zero diagonal included) and all b^3 entries
of the angle tensor (degenerate triplets, with a zero-length side or i = k, included); those extra entries are 0 on
both sides, so the authors' values are these times (b - 1) / b and (b - 1)(b - 2) / b^2, which only matters for small
micro-batches. A zero-length side (two
examples with identical embeddings) gives a cosine of 0, as in the authors' code, and never a NaN gradient. With
fewer than 2 (3) examples in a micro-batch there are no pairs (triplets) and that part is 0.

Unit: batch (a value of the micro-batch as a whole): gradient accumulation averages micro-batch values and cannot
equal one big batch exactly. Computed in float32 at least (float64 inputs stay float64), with autocast off.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Features, Needs, Term, TermBatch, register_term
from .pooling import PooledFeatureOptions, pooled


@dataclass
class RKDOptions(PooledFeatureOptions):
    """Where each example's embedding comes from (see PooledFeatureOptions) and the two parts' weights.

    Attributes:
        distance_weight: lambda_D, the weight of the distance-wise loss (paper: 25).
        angle_weight: lambda_A, the weight of the angle-wise loss (paper: 50).
    """

    distance_weight: float = 25.0
    angle_weight: float = 50.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("distance_weight", "angle_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ValueError(
                "distance_weight and angle_weight are both 0: the rkd term would be 0. Set at least one of them > 0 "
                "(paper: distance_weight=25, angle_weight=50), or drop the term."
            )


def _in_compute_dtype(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both `[b, ...]` inputs flattened to `[b, d]`, in the student's dtype promoted to float32 at least."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    return student.flatten(1).to(dtype), teacher.flatten(1).to(dtype)


def _lengths(differences: torch.Tensor) -> torch.Tensor:
    """Euclidean lengths over the last dimension; exactly 0 for zero vectors, with a finite (zero) gradient there."""
    squared = differences.pow(2).sum(-1)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, torch.ones_like(squared)).sqrt(), 0.0)


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """`[b, d]` -> `[b, b]` pairwise distances divided by the mean of the non-zero ones off the diagonal."""
    b = e.shape[0]
    distances = _lengths(e.unsqueeze(1) - e.unsqueeze(0))
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=e.device)
    counted = off_diagonal & (distances > 0)
    count = counted.sum()
    mean = (distances * counted).sum() / count.clamp_min(1)
    return distances / torch.where(count > 0, mean, torch.ones_like(mean))


def _cosines(e: torch.Tensor) -> torch.Tensor:
    """`[b, d]` -> `[b, b, b]`: entry [j, i, k] is the cosine of the angle at e_j between e_i - e_j and e_k - e_j."""
    sides = e.unsqueeze(0) - e.unsqueeze(1)  # [j, i] = e_i - e_j
    lengths = _lengths(sides).unsqueeze(-1)
    units = sides / torch.where(lengths > 0, lengths, torch.ones_like(lengths))
    return torch.bmm(units, units.transpose(1, 2))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_RKD-D of `[b, d_s]` and `[b, d_t]` embeddings: the Huber mean over the pairs i != j (0 for b < 2)."""
    student, teacher = _in_compute_dtype(student, teacher)
    with torch.autocast(device_type=student.device.type, enabled=False):
        b = student.shape[0]
        losses = F.smooth_l1_loss(_normalised_distances(student), _normalised_distances(teacher), reduction="none")
        pairs = ~torch.eye(b, dtype=torch.bool, device=student.device)
        return (losses * pairs).sum() / max(b * (b - 1), 1)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_RKD-A of `[b, d_s]` and `[b, d_t]` embeddings: the Huber mean over distinct triplets (0 for b < 3)."""
    student, teacher = _in_compute_dtype(student, teacher)
    with torch.autocast(device_type=student.device.type, enabled=False):
        b = student.shape[0]
        losses = F.smooth_l1_loss(_cosines(student), _cosines(teacher), reduction="none")
        eye = torch.eye(b, dtype=torch.bool, device=student.device)
        distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))  # [j, i, k]: j != i, j != k, i != k
        return (losses * distinct).sum() / max(b * (b - 1) * (b - 2), 1)


def rkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> torch.Tensor:
    """lambda_D * L_RKD-D + lambda_A * L_RKD-A (a part whose weight is 0 is not computed)."""
    value = student.new_zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
    if distance_weight:
        value = value + distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight:
        value = value + angle_weight * rkd_angle_loss(student, teacher)
    return value


@register_term("rkd")
class RelationalKD(Term):
    unit = "batch"
    across_tokenizers = True
    Options = RKDOptions

    def needs(self) -> Needs:
        return self.options.pooled_needs()

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s = pooled(student, batch, self.options, "student", "rkd").flatten(1)
        with torch.no_grad():
            t = pooled(teacher, batch, self.options, "teacher", "rkd").flatten(1).detach()
        return rkd_loss(s, t, self.options.distance_weight, self.options.angle_weight)
