"""`span_kd`: a causal LM's next-token distributions across two tokenizers, compared over aligned spans.

The idea of GOLD (Hugging Face, 2025: "Unlocking On-Policy Distillation for Any Model Family", and TRL's
experimental `GOLDTrainer`, whose code hfkd read and did not copy), for teachers and students whose tokenizers differ:

1. Sequences: the two tokenizations of one text are cut into spans whose text both cover with whole tokens
   (hfkd.alignment.align_spans, on character offsets). Each model's probability of a span is merged by the chain
   rule: the distribution of the span's first token times the probability of its remaining actual tokens
   (hfkd.alignment.span_log_probs), at temperature T.
2. Vocabularies: token strings both vocabularies hold are compared id to id with the generalised KL
   (I-divergence), the rest by ULD's sorted L1 (hfkd.losses.cross_vocab.span_divergence).

Where the tokenizers agree (one token per span on each side, one vocabulary) the value is exactly hfkd's `logit`
term with forward KL: T^2 KL(p_t || p_s) per predicted token (tested). GOLD compares matched tokens by JSD and weighs
the two parts by the share of matched ids by default; hfkd takes the I-divergence for that exactness and weighs both
parts 1 (`matched_weight`, `unmatched_weight`).

Defaults: temperature 1 (GOLD's; T^2 scales the value as in Hinton's KD). Unit: the spans (their count over the
accumulation window). Needs `teacher_processing_class` (the batches then carry the spans).
"""

from dataclasses import dataclass

import torch

from ..alignment import span_log_probs
from ..losses.cross_vocab import span_divergence
from .base import Features, Needs, Term, TermBatch, register_term


@dataclass
class SpanKDOptions:
    """Options of the `span_kd` term.

    Attributes:
        temperature: softmax temperature of both models, > 0; the value is scaled by T^2.
        matched_weight: weight of the generalised KL over the token strings both vocabularies hold, >= 0.
        unmatched_weight: weight of the sorted L1 over the remaining ids, >= 0.
    """

    temperature: float = 1.0
    matched_weight: float = 1.0
    unmatched_weight: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"span_kd: temperature must be > 0, got {self.temperature}.")
        if self.matched_weight < 0 or self.unmatched_weight < 0:
            raise ValueError("span_kd: matched_weight and unmatched_weight must be >= 0.")


def check_alignment(name: str, student: Features, batch: TermBatch) -> None:
    """The cross-tokenizer terms need causal-LM logits and the spans of two tokenizations (checked in that order:
    a classifier is refused for what it is, whatever its batches carry)."""
    if not (student.kind.token_level and student.kind.shifts_labels) or student.kind.encoder_decoder:
        raise ValueError(
            f"The {name} term compares next-token distributions of decoder-only causal LMs; for classifiers (also "
            "across tokenizers) use the logit term (the label space is shared)."
        )
    if batch.alignment is None:
        raise ValueError(
            f"The {name} term compares a teacher and a student that tokenize differently, but the batch carries no "
            "spans between two tokenizations: pass teacher_processing_class (the teacher's tokenizer) to "
            "DistillationTrainer or set it in DistillationConfig (and let hfkd collate the text rows)."
        )
    if student.logits is None:
        raise ValueError(f"The {name} term reads the student's logits, but it returned none.")


def span_distributions(name: str, student: Features, teacher: Features, batch: TermBatch, temperature: float):
    """Both models' log q of every span (hfkd.alignment.span_log_probs), the teacher's without gradients."""
    spans = batch.alignment
    log_q_s = span_log_probs(student.logits, spans.student_ids, spans.student, temperature)
    with torch.no_grad():
        log_q_t = span_log_probs(teacher.logits, spans.teacher_ids, spans.teacher, temperature)
    if log_q_s.shape[0] != log_q_t.shape[0]:
        raise ValueError(
            f"{name}: {log_q_s.shape[0]} student spans but {log_q_t.shape[0]} teacher spans in a batch; the spans of "
            "hfkd.two_tokenizers pair up one to one (was the batch built by TwoTokenizerCollator?)."
        )
    return log_q_s, log_q_t


@register_term("span_kd")
class SpanKD(Term):
    unit = "mixed"
    across_tokenizers = True
    across_vocabularies = True
    Options = SpanKDOptions

    def needs(self) -> Needs:
        return Needs(logits=True)

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        check_alignment(self.name, student, batch)

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        spans, t = batch.alignment, self.options.temperature
        log_q_s, log_q_t = span_distributions(self.name, student, teacher, batch, t)
        values = span_divergence(
            log_q_s,
            log_q_t,
            spans.matched_student,
            spans.matched_teacher,
            self.options.matched_weight,
            self.options.unmatched_weight,
        )
        return values.sum() * (t * t) / batch.counts["spans"]
