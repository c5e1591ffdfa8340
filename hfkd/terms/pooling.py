"""One vector per example from a model's features, for terms that relate examples to each other.

The features are a hidden-states layer (`[batch, tokens, width]` for transformers, `[batch, channels, h, w]` for
conv nets), a named submodule's output, or already a vector per example (`[batch, width]`). Pooling:
- `mean`: the mean over the positions the attention mask keeps (padding never counts), or over a conv map's
  spatial positions (global average pooling);
- `cls`: the first position (BERT's [CLS]); for conv maps the same as `mean`;
- `last`: the last kept position of each example (decoder models).
"""

from dataclasses import dataclass

import torch

from .base import Features, Needs, TermBatch

POOLINGS = ("mean", "cls", "last")


@dataclass
class PooledFeatureOptions:
    """Where a relation term takes each example's vector from.

    Attributes:
        layer: index into `hidden_states` (0 = embeddings output, -1 = last layer), used for both models.
        student_layer / teacher_layer: override `layer` for one model.
        pooling: 'mean' (mask-aware), 'cls' or 'last'.
        student_module / teacher_module: take the output of this submodule (a name from `named_modules()`) instead
            of a hidden-states layer, e.g. a timm-style CNN's `global_pool`.
    """

    layer: int = -1
    student_layer: int | None = None
    teacher_layer: int | None = None
    pooling: str = "mean"
    student_module: str | None = None
    teacher_module: str | None = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not known; choose one of {list(POOLINGS)}.")

    def teacher_hidden_layers(self, num_student: int, num_teacher: int) -> list[int] | None:
        """The teacher hidden_states index pooled (for a teacher cache), or None when a submodule is read."""
        if self.teacher_module:
            return None
        layer = self.layer if self.teacher_layer is None else self.teacher_layer
        return [layer % num_teacher] if -num_teacher <= layer < num_teacher else None

    def pooled_needs(self) -> Needs:
        return Needs(
            hidden_states=not (self.student_module and self.teacher_module),
            student_modules=(self.student_module,) if self.student_module else (),
            teacher_modules=(self.teacher_module,) if self.teacher_module else (),
        )


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def pool(features: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """`[batch, ...]` features -> `[batch, width]` (float32 at least, so that relations are not taken in bf16)."""
    features = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    if features.dim() == 2:
        return features
    if features.dim() == 4:  # conv map [B, C, H, W]: global average pooling
        return features.mean(dim=(2, 3))
    if features.dim() != 3:
        raise ValueError(f"Cannot pool features of shape {tuple(features.shape)}; expected 2, 3 or 4 dimensions.")
    if mask is None or mask.shape != features.shape[:2]:
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    if pooling == "cls":
        return features[:, 0]
    if pooling == "last":
        last = mask.long().cumsum(1).argmax(1)  # the last kept position of each row
        return features[torch.arange(features.shape[0], device=features.device), last]
    weights = mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def pooled(side: Features, batch: TermBatch, options: PooledFeatureOptions, which: str, term: str) -> torch.Tensor:
    """The pooled vector per example of one model (`which` is 'student' or 'teacher')."""
    value, mask = unpooled(side, batch, options, which, term)
    return pool(value, mask, options.pooling)


def unpooled(
    side: Features, batch: TermBatch, options: PooledFeatureOptions, which: str, term: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The features `pooled` would pool (a hidden-states layer or a submodule's output) and that side's mask."""
    module = getattr(options, f"{which}_module")
    if module:
        value = _first(side.modules[module])
    else:
        layer = getattr(options, f"{which}_layer")
        layer = options.layer if layer is None else layer
        states = side.hidden_states
        if states is None:
            raise ValueError(
                f"The {term} term pools the {which}'s hidden_states, but the {which} returned none; give "
                f"{which}_module (a submodule whose output to pool) for models without hidden_states."
            )
        if not -len(states) <= layer < len(states):
            raise ValueError(
                f"The {term} term takes {which} hidden_states[{layer}], but the {which} has {len(states)} entries "
                f"(valid: {-len(states)}..{len(states) - 1}); set {which}_layer or layer."
            )
        value = states[layer]
    # A teacher with its own tokenizer has its own padding (TermBatch.teacher_mask).
    mask = batch.teacher_mask if which == "teacher" and batch.teacher_mask is not None else batch.mask
    return value, mask
