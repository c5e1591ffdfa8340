"""`hidden`: the student's hidden states against the teacher's at mapped layers (FitNets-style feature knowledge).

Romero et al. (ICLR 2015), "FitNets: Hints for Thin Deep Nets": a student feature, passed through a learned
regressor where the widths differ, is pulled towards the teacher's feature at a matched layer. hfkd matches every
student `hidden_states` entry to a teacher entry (`layer_map`: 'uniform' by default, 'last', or explicit indices;
index 0 is the embeddings output) and compares them position by position with MSE (mean over the features; the
paper's L2) or 1 - cosine. A linear map (token features) or a 1x1 convolution (conv maps) bridges other widths;
the projections are this term's state: trained with the student, saved in each checkpoint, never in the student.

Short form: `hidden_weight`, `hidden_loss`, `hidden_layer_map`. Each matched pair is averaged over the positions the
attention mask keeps (over examples for images and conv maps, which have no padding), counted over the whole
accumulation window; the term is the mean over pairs (unit "mixed").

A teacher with its own tokenizer (hfkd.two_tokenizers) has other positions: each model's features are then averaged
over the tokens of each span the two tokenizations share (hfkd.alignment), and the pairs compare span by span,
counted over the spans.
"""

from dataclasses import dataclass

import torch

from ..alignment import span_mean
from ..layer_map import LayerMapSpec, resolve_layer_map
from ..losses import HIDDEN_LOSSES
from ..projection import FeatureProjector, read_legacy_projections
from ..streams import as_positions, hidden_streams
from ..units import masked_sum
from .base import Features, Needs, Term, TermBatch, cache_error, register_term


@dataclass
class HiddenOptions:
    """Options of the `hidden` term (short-form fields in brackets).

    Attributes:
        loss: 'mse' or 'cosine' per position, or a registered hidden loss (`hidden_loss`).
        layer_map: 'uniform', 'last' or one teacher `hidden_states` index per student entry (`hidden_layer_map`).
    """

    loss: str = "mse"
    layer_map: LayerMapSpec = "uniform"


@register_term("hidden")
class HiddenTerm(Term):
    unit = "mixed"
    across_tokenizers = True
    Options = HiddenOptions
    short_form = {"weight": "hidden_weight", "loss": "hidden_loss", "layer_map": "hidden_layer_map"}

    def __init__(self, options=None):
        super().__init__(options)
        self.pairs: dict[str, list[tuple[int, int]]] | None = None  # stream -> (student, teacher) indices
        self.projector: FeatureProjector | None = None

    def needs(self) -> Needs:
        return Needs(hidden_states=True)

    def teacher_hidden_layers(self, num_student: int, num_teacher: int) -> list[int]:
        pairs = resolve_layer_map(
            self.options.layer_map, num_student, num_teacher, field_name="hidden_layer_map", has_embeddings=True
        )
        return sorted({t for _, t in pairs})

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        s_streams = hidden_streams(student.outputs, student.kind)
        t_streams = hidden_streams(teacher.outputs, student.kind)
        if not s_streams or set(s_streams) != set(t_streams):
            raise ValueError("hidden_weight > 0, but the student or teacher returned no `hidden_states`.")
        pairs, specs = {}, {}
        first = None
        for stream, s_states in s_streams.items():
            t_states = t_streams[stream]
            pairs[stream] = resolve_layer_map(
                self.options.layer_map,
                len(s_states),
                len(t_states),
                field_name="hidden_layer_map",
                has_embeddings=True,
            )
            for s_idx, t_idx in pairs[stream]:
                s, t = s_states[s_idx], t_states[t_idx]
                first = s if first is None else first
                if t is None:
                    held = [i for i, state in enumerate(t_states) if state is not None]
                    raise cache_error(
                        f"hidden_layer_map pairs teacher hidden_states[{t_idx}], but the teacher cache holds "
                        f"{held}; rebuild it with `hfkd cache` for this student and layer map."
                    )
                where = f"student hidden_states[{s_idx}] {tuple(s.shape)} vs teacher hidden_states[{t_idx}] {tuple(t.shape)}"
                if s.dim() != t.dim() or s.dim() not in (3, 4):
                    raise ValueError(
                        f"hidden_layer_map pairs features no projection can bridge: {where}. hfkd projects token "
                        "features [batch, tokens, width] onto token features and conv maps [batch, channels, h, w] "
                        "onto conv maps; pick a teacher and student of the same kind, or set hidden_weight=0."
                    )
                if s.dim() == 3 and s.shape[1] != t.shape[1] and batch.alignment is None:
                    raise ValueError(
                        f"The hidden term compares positions one to one, but the sequence lengths differ ({where}); "
                        "use the same tokenizer (or patch size) for both models, or set hidden_weight=0."
                    )
                feature_axis = 1 if s.dim() == 4 else -1
                if s.shape[feature_axis] != t.shape[feature_axis]:
                    kind = "conv" if s.dim() == 4 else "linear"
                    specs[f"{stream}.{s_idx}"] = (kind, s.shape[feature_axis], t.shape[feature_axis])
        self.pairs = pairs
        if specs:
            # The student's width and dtype: the projections run on its features.
            self.projector = FeatureProjector(specs).to(
                device=first.device, dtype=first.dtype if first.is_floating_point() else None
            )

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s_streams = hidden_streams(student.outputs, student.kind)
        t_streams = hidden_streams(teacher.outputs, student.kind)
        selected = {f"{stream}.{s}": s_streams[stream][s] for stream, pairs in self.pairs.items() for s, _ in pairs}
        if self.projector is not None:
            selected = self.projector(selected)
        loss_fn = HIDDEN_LOSSES[self.options.loss]
        total, n = 0.0, 0
        spans = batch.alignment
        for stream, pairs in self.pairs.items():
            for s_idx, t_idx in pairs:
                if spans is not None:  # own tokenizers: each model's tokens averaged over the spans they share
                    s = span_mean(selected[f"{stream}.{s_idx}"], spans.student)
                    t = span_mean(t_streams[stream][t_idx], spans.teacher).to(s.dtype)
                    total = total + loss_fn(s, t).sum() / batch.counts["spans"]
                    n += 1
                    continue
                s, t = as_positions(selected[f"{stream}.{s_idx}"], t_streams[stream][t_idx])
                mask = batch.masks.get(stream)
                if mask is None or mask.shape != s.shape[:2]:
                    # Vision tokens and feature maps have no padding: each example is one unit.
                    mask, count = None, batch.counts["examples"]
                else:
                    count = batch.counts[stream]
                total = total + masked_sum(loss_fn(s, t), mask) / count
                n += 1
        return total / n

    def legacy_state(self, directory: str) -> dict[str, torch.Tensor] | None:
        # Checkpoints of hfkd before terms were plugins kept the projections in hfkd_projector.safetensors.
        if self.projector is None:
            return None
        state = read_legacy_projections(directory, self.projector.specs)
        return {f"projector.{key}": value for key, value in state.items()} if state is not None else None
