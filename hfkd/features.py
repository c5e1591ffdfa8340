"""What the two models expose to the distillation terms, and which positions of it count.

Everything here reads model *outputs* and batch *inputs*; it never runs a model. A "stream" is one stack of layers:
`main` for encoder-only, decoder-only and vision models, `encoder` and `decoder` for encoder-decoder models.
"""

from dataclasses import dataclass

import torch
from transformers.models.auto import modeling_auto

from .alignment import span_starts
from .batch import SPANS

# Heads whose logits hold one distribution per position (the others give one per example).
_TOKEN_LEVEL_CLASSES = frozenset(
    name
    for mapping in (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    )
    for names in mapping.values()
    for name in ((names,) if isinstance(names, str) else names)
)


@dataclass
class ModelKind:
    """How a model's logits line up with its labels.

    Attributes:
        shifts_labels: causal LM: logits at position t predict the label at t + 1.
        encoder_decoder: hidden states and attentions come as an encoder and a decoder stream.
        token_level: one distribution per position rather than one per example.
    """

    shifts_labels: bool
    encoder_decoder: bool
    token_level: bool

    @property
    def streams(self) -> tuple[str, ...]:
        return ("encoder", "decoder") if self.encoder_decoder else ("main",)


def model_kind(model: torch.nn.Module, shifts_labels: bool) -> ModelKind:
    """Guesses the kind from the (unwrapped) model class; the trainer confirms `token_level` on a real batch."""
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    token_level = shifts_labels or type(model).__name__ in _TOKEN_LEVEL_CLASSES
    return ModelKind(shifts_labels=shifts_labels, encoder_decoder=encoder_decoder, token_level=token_level)


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


def hidden_streams(outputs, kind: ModelKind) -> dict[str, tuple[torch.Tensor, ...]]:
    """The `hidden_states` tuple of each stream (index 0 = embeddings output)."""
    if kind.encoder_decoder:
        streams = {
            "encoder": getattr(outputs, "encoder_hidden_states", None),
            "decoder": getattr(outputs, "decoder_hidden_states", None),
        }
    else:
        streams = {"main": getattr(outputs, "hidden_states", None)}
    return {name: value for name, value in streams.items() if value is not None}


def attention_streams(outputs, kind: ModelKind) -> dict[str, tuple[torch.Tensor, ...]]:
    """The self-attention probability tuple of each stream (cross-attention is left out)."""
    if kind.encoder_decoder:
        streams = {
            "encoder": getattr(outputs, "encoder_attentions", None),
            "decoder": getattr(outputs, "decoder_attentions", None),
        }
    else:
        streams = {"main": getattr(outputs, "attentions", None)}
    return {name: value for name, value in streams.items() if value is not None}


def as_positions(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brings a pair of features to `[batch, positions, features]`.

    Conv feature maps `[B, C, H, W]` of other resolutions are resized to the teacher's, bilinearly: the student's
    map covers the same image, so its positions correspond after scaling.
    """
    if student.dim() == 4:
        if student.shape[-2:] != teacher.shape[-2:]:
            student = torch.nn.functional.interpolate(
                student, size=teacher.shape[-2:], mode="bilinear", align_corners=False
            )
        return student.flatten(2).transpose(1, 2), teacher.flatten(2).transpose(1, 2)
    return student, teacher
