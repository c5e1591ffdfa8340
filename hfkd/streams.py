"""What a model exposes to the distillation terms: its kind (how logits line up with labels) and its streams.

Everything here reads model *outputs*; it never runs a model. A "stream" is one stack of layers: `main` for
encoder-only, decoder-only and vision models, `encoder` and `decoder` for encoder-decoder models.
"""

from dataclasses import dataclass

import torch
from transformers.models.auto import modeling_auto

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
