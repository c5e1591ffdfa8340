"""Distillation losses: pure functions of the two models' outputs, registered by name.

A loss never receives a model. Each returns one value per position (it reduces only the feature axis), so that
the trainer can mask padding and normalise over the right count, also under gradient accumulation:

- logit losses: `fn(student_logits, teacher_logits, *, temperature, beta) -> Tensor` over `[..., vocab]`
  returning `[...]`;
- hidden losses: `fn(student, teacher) -> Tensor` over `[..., hidden]` returning `[...]`;
- attention losses: `fn(student, teacher) -> Tensor` over attention probabilities `[batch, heads, query, key]`
  returning `[batch, query]` (averaged over heads).

Register your own with `register_logit_loss("name")` (and likewise for the others), then set
`logit_loss="name"` in `DistillationConfig`.
"""

from ._registry import (
    ATTENTION_LOSSES,
    HIDDEN_LOSSES,
    LOGIT_LOSSES,
    register_attention_loss,
    register_hidden_loss,
    register_logit_loss,
)
from .attention import attention_kl, attention_mse
from .hidden import hidden_cosine, hidden_mse
from .logits import forward_kl, generalized_jsd, logit_mse, reverse_kl

__all__ = [
    "ATTENTION_LOSSES",
    "HIDDEN_LOSSES",
    "LOGIT_LOSSES",
    "attention_kl",
    "attention_mse",
    "forward_kl",
    "generalized_jsd",
    "hidden_cosine",
    "hidden_mse",
    "logit_mse",
    "register_attention_loss",
    "register_hidden_loss",
    "register_logit_loss",
    "reverse_kl",
]
