"""Losses between attention probability maps `[batch, heads, query, key]` (TinyBERT, MiniLM)."""

import torch

from ._registry import register_attention_loss

# Keeps log(0) finite where the student gives a key no attention at all; far below any float32 softmax output.
_EPS = 1e-12


@register_attention_loss("kl")
def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the key axis, averaged over heads: `[batch, query]`."""
    s, t = student.float(), teacher.float()
    # xlogy gives 0 where the teacher's probability is 0 (masked keys), whatever the student has there.
    per_row = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(_EPS))).sum(-1)
    return per_row.mean(1)


@register_attention_loss("mse")
def attention_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the key axis, averaged over heads: `[batch, query]`."""
    return (student.float() - teacher.float()).pow(2).mean(-1).mean(1)
