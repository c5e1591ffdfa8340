"""Units: which positions of a batch count for each term, and how many there are.

Every term's sum is divided by the count of its unit (tokens, labelled logits, examples, spans), counted once per
accumulation window over all micro-batches and processes (`WindowUnits`), so that a window of micro-batches gives
the same gradient as one batch holding them all. This module is the one place those masks and counts are made.
"""

import torch

from .alignment import span_starts
from .batch import SPANS
from .streams import ModelKind


def _two_dim(mask: object) -> torch.Tensor | None:
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def unit_masks(inputs: dict, kind: ModelKind) -> dict[str, torch.Tensor | None]:
    """Which positions count, per term and stream; None means one unit per example (mean over its positions).

    - `logit`: token-level heads count the positions whose label is not -100 (shifted for causal LMs), or, without
      labels, the positions the attention mask keeps; example-level heads count examples.
    - streams: the attention mask of that stream (decoder: the labels that are not -100), else examples.
    """
    labels = inputs.get("labels")
    labels = labels if isinstance(labels, torch.Tensor) and labels.dim() == 2 else None
    attention = _two_dim(inputs.get("attention_mask"))
    masks: dict[str, torch.Tensor | None] = {"examples": None}

    if not kind.token_level:
        masks["logit"] = None
    elif kind.encoder_decoder:
        masks["logit"] = labels.ne(-100) if labels is not None else _two_dim(inputs.get("decoder_attention_mask"))
    elif labels is not None:
        masks["logit"] = labels[:, 1:].ne(-100) if kind.shifts_labels else labels.ne(-100)
    elif attention is not None:
        masks["logit"] = attention[:, 1:] if kind.shifts_labels else attention
    else:
        masks["logit"] = None

    if kind.encoder_decoder:
        masks["encoder"] = attention
        decoder = _two_dim(inputs.get("decoder_attention_mask"))
        masks["decoder"] = labels.ne(-100) if labels is not None else decoder
    else:
        masks["main"] = attention
    spans = inputs.get(SPANS)
    if isinstance(spans, torch.Tensor):  # a teacher with its own tokenizer: the cross-tokenizer terms count spans
        masks["spans"] = span_starts(spans)
    return masks


def batch_size(inputs: dict) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("The batch holds no tensor; hfkd cannot tell its size.")


def unit_counts(masks: dict[str, torch.Tensor | None], num_examples: int) -> dict[str, torch.Tensor]:
    """Number of units behind each mask, as float tensors (no host sync)."""
    counts = {}
    for name, mask in masks.items():
        counts[name] = mask.sum().float() if mask is not None else torch.tensor(float(num_examples))
    return counts


def masked_sum(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of a per-position loss over the units that count.

    With a mask, positions are units; without one, each example is a unit worth the mean over its positions.
    `torch.where` rather than multiplication so that NaN or inf at masked positions cannot leak in.
    """
    if mask is not None:
        return torch.where(
            mask, per_position, torch.zeros((), dtype=per_position.dtype, device=per_position.device)
        ).sum()
    if per_position.dim() == 1:
        return per_position.sum()
    return per_position.flatten(1).mean(1).sum()
