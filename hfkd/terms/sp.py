"""Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

For a micro-batch of b examples with pooled features Q_S (student) and Q_T (teacher), flattened to one row per
example, the pairwise similarity matrices are G = Q Q^T with each row L2-normalised (eq. 2-3 of the paper):
G~[i] = G[i] / ||G[i]||_2. The loss (eq. 4) is

    L_SP = 1 / b^2 * || G~_T - G~_S ||_F^2

summed over the paired layers (here: one pair, chosen by the pooling options). The paper weights it with
gamma = 3000 on CIFAR-10 (the weight of this term in `terms`). Student and teacher widths may differ: only the
b x b similarities are compared, so no projection is needed.

Unit: batch (a value of the micro-batch as a whole): gradient accumulation averages micro-batch values and
cannot equal one big batch exactly.
"""

from dataclasses import dataclass

import torch

from .base import Features, Needs, Term, TermBatch, register_term
from .pooling import PooledFeatureOptions, pooled


@dataclass
class SPOptions(PooledFeatureOptions):
    """Where each example's features come from (see PooledFeatureOptions); the paper's weight is 3000."""


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`[b, d_s]`, `[b, d_t]` -> L_SP, computed in float32 at least."""
    b = student.shape[0]
    g_s = torch.nn.functional.normalize(student @ student.transpose(0, 1), dim=1)
    g_t = torch.nn.functional.normalize(teacher @ teacher.transpose(0, 1), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


@register_term("sp")
class SimilarityPreserving(Term):
    unit = "batch"
    across_tokenizers = True
    Options = SPOptions

    def needs(self) -> Needs:
        return self.options.pooled_needs()

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s = pooled(student, batch, self.options, "student", "sp").flatten(1)
        with torch.no_grad():
            t = pooled(teacher, batch, self.options, "teacher", "sp").flatten(1).to(s.dtype)
        return similarity_preserving_loss(s, t)
