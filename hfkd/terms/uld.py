"""`uld`: Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv 2402.12030, TMLR 2025), for causal LMs whose tokenizers differ.

At each aligned position both next-token distributions are sorted from the most to the least likely, the smaller
vocabulary padded with zeros, and compared by L1: sum_i |sort(p_s)_i - sort(p_t)_i|, the paper's closed form of a
Wasserstein distance between the two distributions when moving mass between any two tokens costs the same. It needs
no correspondence between the vocabularies (and cannot tell which token is which). The paper adds it to the
student's cross-entropy with a weight (lambda, tuned per task; this term's weight, default 1) at temperature 1 and pairs the i-th answer token of one tokenization with
the i-th of the other. hfkd pairs them by the spans the two tokenizations share instead (hfkd.alignment, as GOLD's
extension of ULD does), so that a word cut into two tokens on one side is not compared with the next word; a
multi-token span's probability is merged by the chain rule (hfkd.alignment.span_log_probs).

Defaults: temperature 1 (the paper's), weight 1. Unit: the spans. Needs `teacher_processing_class`.
"""

from dataclasses import dataclass

import torch

from ..losses.cross_vocab import sorted_l1
from .base import Features, Needs, Term, TermBatch, register_term
from .span_kd import check_alignment, span_distributions


@dataclass
class ULDOptions:
    """Options of the `uld` term.

    Attributes:
        temperature: softmax temperature of both models, > 0 (the paper: 1).
    """

    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"uld: temperature must be > 0, got {self.temperature}.")


@register_term("uld")
class ULD(Term):
    unit = "mixed"
    across_tokenizers = True
    across_vocabularies = True
    Options = ULDOptions

    def needs(self) -> Needs:
        return Needs(logits=True)

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        check_alignment(self.name, student, batch)

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        log_q_s, log_q_t = span_distributions(self.name, student, teacher, batch, self.options.temperature)
        return sorted_l1(log_q_s.exp(), log_q_t.exp()).sum() / batch.counts["spans"]
