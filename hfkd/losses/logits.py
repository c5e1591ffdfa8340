"""Response-based losses on the two models' output logits (Hinton et al. 2015; GKD's generalised JSD)."""

import math

import torch
import torch.nn.functional as F

from ._registry import register_logit_loss


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # float32 even under bf16/fp16 autocast: softmax and log of small probabilities lose everything in half precision.
    # The clamp turns a logit of -inf (a class masked out) into a huge finite negative, so 0 * log 0 gives 0, not NaN.
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float64 stays float64 (reference tests)
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1).clamp_min(torch.finfo(dtype).min)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score of each logit vector over the class axis (Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024): (z - mean(z)) / (std(z) + eps), with the unbiased std as in the paper's code.

    The divergence then compares the shapes of the two distributions, not the logits' ranges: a student need not
    match the teacher's logit scale, only their ranking and relative gaps. The temperature still applies after it
    (the paper's "base temperature", 2 on CIFAR-100).
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + eps)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@register_logit_loss("kl")
def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, **_
) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T) per position: the student covers the teacher's whole distribution."""
    log_t = _log_probs(teacher_logits, temperature)
    log_s = _log_probs(student_logits, temperature)
    return _kl(log_t, log_s) * temperature**2


@register_logit_loss("reverse_kl")
def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, **_
) -> torch.Tensor:
    """T^2 * KL(student_T || teacher_T) per position: mode-seeking, as in MiniLLM."""
    log_t = _log_probs(teacher_logits, temperature)
    log_s = _log_probs(student_logits, temperature)
    return _kl(log_s, log_t) * temperature**2


@register_logit_loss("jsd")
def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    **_,
) -> torch.Tensor:
    """T^2 * generalised JSD per position, as GKD defines it.

    With M = beta * p_teacher + (1 - beta) * p_student, JSD_beta = beta KL(teacher || M) + (1 - beta) KL(student ||
    M). Like GKD, beta = 0 is taken to mean forward KL and beta = 1 reverse KL (the formula itself vanishes there).
    """
    if beta <= 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if beta >= 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    log_t = _log_probs(teacher_logits, temperature)
    log_s = _log_probs(student_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    return (beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)) * temperature**2


@register_logit_loss("mse")
def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **_) -> torch.Tensor:
    """Mean squared error of the raw logits over the class axis (no temperature), as in Ba & Caruana 2014."""
    return (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
