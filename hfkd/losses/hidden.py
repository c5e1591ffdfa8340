"""Feature-based losses between (projected) student and teacher hidden states."""

import torch
import torch.nn.functional as F

from ._registry import register_hidden_loss


@register_hidden_loss("mse")
def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the feature axis, per position (FitNets, TinyBERT)."""
    return (student.float() - teacher.float()).pow(2).mean(-1)


@register_hidden_loss("cosine")
def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over the feature axis, per position (DistilBERT's cosine embedding loss)."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
