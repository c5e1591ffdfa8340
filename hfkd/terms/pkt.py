"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018).

PKT matches the probability distributions of the two models' feature spaces over a micro-batch of b examples. With
x_i the pooled feature vector of example i (one row per example, flattened), L2-normalised, and the paper's cosine
kernel

    K(a, b) = (cos(a, b) + 1) / 2  in [0, 1],

the conditional probability of picking example i given example j is (teacher p, student q)

    p_{i|j} = K(t_i, t_j) / sum_{k != j} K(t_k, t_j),    q_{i|j} likewise with the student's features,

and the loss is the KL divergence of the teacher's conditional distributions from the student's, summed over the
pairs:

    L_PKT = sum_j sum_{i != j} p_{i|j} log((p_{i|j} + eps) / (q_{i|j} + eps)).

Choices, and where they differ from the authors' code (passalis/probabilistic_kt, copied by torchdistill and
RepDistiller):
- The diagonal is excluded, as in the paper (k != j in the normaliser, i != j in the sum). The authors' code keeps it:
  it normalises each row of the full b x b kernel (self-similarity 1 included) and takes the mean over all b^2
  entries rather than the sum.
- eps (default 1e-7, the authors' value) guards the log ratio as in the authors' code, and the L2 normalisation,
  which divides by max(||x||, eps) (a zero vector stays zero, so its cosines are 0 and its kernel values 1/2; the
  authors divide by ||x|| + eps). Scaling either model's features by any c > 0 leaves the value unchanged, and
  identical distributions give exactly 0.
- A micro-batch of fewer than 2 examples has no pairs: the value is 0 (with 2, every conditional distribution has a
  single entry, 1, and the value is 0 as well).

Recommended `weight`: torchdistill's ImageNet config (ResNet-152 -> ResNet-18, batch 32) and RepDistiller's CIFAR-100
script (batch 64) weight the authors' loss by 30000. That loss is a mean over b^2 entries, so about (1 / b^2) times
the sum here; the matching weight for this term is about 30000 / b^2 (29 at b = 32, 7.3 at b = 64). (No weight is
taken from the paper itself.) Student and teacher widths may differ: only b x b kernels are
compared, so no projection is needed.

Unit: batch (a value of the micro-batch as a whole): gradient accumulation averages micro-batch values and cannot
equal one big batch exactly. Computed in float32 at least (float64 inputs stay float64), with autocast off.
"""

import math
from dataclasses import dataclass

import torch

from .base import Features, Needs, Term, TermBatch, register_term
from .pooling import PooledFeatureOptions, pooled


@dataclass
class PKTOptions(PooledFeatureOptions):
    """Where each example's features come from (see PooledFeatureOptions), and the stabilising epsilon.

    Attributes:
        eps: added to both probabilities inside the log ratio, and the smallest norm divided by in the L2
            normalisation (authors' code: 1e-7).
    """

    eps: float = 1e-7

    def __post_init__(self):
        super().__post_init__()
        value = self.eps
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"eps must be a finite number > 0, got {value!r}.")


def conditional_probabilities(features: torch.Tensor, eps: float) -> torch.Tensor:
    """`[b, d]` -> `[b, b]` with entry [i, j] = p_{i|j} (each column sums to 1 over i != j; 0 on the diagonal)."""
    b = features.shape[0]
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(eps)
    kernel = ((unit @ unit.transpose(0, 1) + 1.0) / 2.0).clamp(0.0, 1.0)
    kernel = kernel.masked_fill(torch.eye(b, dtype=torch.bool, device=features.device), 0.0)
    totals = kernel.sum(0, keepdim=True)
    return kernel / torch.where(totals > 0, totals, torch.ones_like(totals))


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """L_PKT of `[b, d_s]` and `[b, d_t]` features (float32 at least, autocast off)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.flatten(1).to(dtype), teacher.flatten(1).to(dtype)
    with torch.autocast(device_type=student.device.type, enabled=False):
        p = conditional_probabilities(teacher, eps)
        q = conditional_probabilities(student, eps)
        # The diagonal has p = q = 0: log(eps / eps) = 0 there, so the sum runs over the pairs i != j only.
        return (p * torch.log((p + eps) / (q + eps))).sum()


@register_term("pkt")
class ProbabilisticKT(Term):
    unit = "batch"
    across_tokenizers = True
    Options = PKTOptions

    def needs(self) -> Needs:
        return self.options.pooled_needs()

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s = pooled(student, batch, self.options, "student", "pkt").flatten(1)
        with torch.no_grad():
            t = pooled(teacher, batch, self.options, "teacher", "pkt").flatten(1).detach()
        return pkt_loss(s, t, self.options.eps)
