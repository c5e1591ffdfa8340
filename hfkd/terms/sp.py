"""Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

For a micro-batch of b examples with pooled features Q_S (student) and Q_T (teacher), flattened to one row per
example, the pairwise similarity matrices are G = Q Q^T with each row L2-normalised (eq. 2-3 of the paper):
G~[i] = G[i] / ||G[i]||_2. The loss (eq. 4) is

    L_SP = 1 / b^2 * || G~_T - G~_S ||_F^2

summed over the paired layers (here: one pair, chosen by the pooling options). The paper weights it with
gamma = 3000 on CIFAR-10 (the weight of this term in `terms`). Student and teacher widths may differ: only the
b x b similarities are compared, so no projection is needed.

Which vector per example (`flatten`): the paper's Q is the activation map reshaped to one row per example, and its
code (`feat.view(feat.size(0), -1)`) flattens the whole [C, H, W] map, so the similarities see where in the image
the activations lie. `flatten=True` does that: a conv map [B, C, H, W] becomes [B, C*H*W]; a token sequence
[B, T, D] becomes [B, T*D] with the positions the attention mask drops set to 0 (padding adds nothing to any dot
product); a [B, D] vector stays as it is. `flatten=False` (the default) takes the pooled vector (PooledFeatureOptions:
global average pooling for conv maps, the `pooling` of token sequences), as hfkd did before the option existed.
The default stays pooled because the measurement gives no reason to change it (benchmarks/METHODS.md, "Task-fitted
defaults (issue 21 item 3)", "KD + SP, flattened maps" against "KD + SP", one seed): on Fashion-MNIST the flattened
maps were 1.6 pt worse on the ResNet student and 5.0 pt better on the ViT student, and both forms stayed 5-12 pt
below the student trained on the labels alone.

Unit: batch (a value of the micro-batch as a whole): gradient accumulation averages micro-batch values and
cannot equal one big batch exactly.
"""

from dataclasses import dataclass

import torch

from .base import Features, Needs, Term, TermBatch, register_term
from .pooling import PooledFeatureOptions, pooled, unpooled


@dataclass
class SPOptions(PooledFeatureOptions):
    """Where each example's features come from (see PooledFeatureOptions); the paper's weight is 3000.

    Attributes:
        flatten: compare the flattened feature maps, as the paper's code does (padding zeroed), instead of the
            pooled vectors (default False; `pooling` is then unused).
    """

    flatten: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.flatten, bool):
            raise ValueError(f"flatten must be true or false, got {self.flatten!r}.")


def flattened(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`[B, ...]` -> `[B, everything else]`, float32 at least; a token sequence's masked-out positions are zeroed."""
    features = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    if features.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(features.shape[:2]):
        features = features * mask.to(features.dtype).unsqueeze(-1)
    return features.flatten(1)


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

    def _vectors(self, side: Features, batch: TermBatch, which: str) -> torch.Tensor:
        if self.options.flatten:
            return flattened(*unpooled(side, batch, self.options, which, "sp"))
        return pooled(side, batch, self.options, which, "sp").flatten(1)

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s = self._vectors(student, batch, "student")
        with torch.no_grad():
            t = self._vectors(teacher, batch, "teacher").to(s.dtype)
        return similarity_preserving_loss(s, t)
