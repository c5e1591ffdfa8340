"""`attention`: the student's self-attention maps against the teacher's at mapped layers.

As in TinyBERT (Jiao et al., Findings of EMNLP 2020) and MobileBERT, which distil the attention probability maps
layer by layer: here KL(teacher || student) per query row (the choice of MiniLM, Wang et al. 2020, for its last
layer) or the MSE of the probabilities (TinyBERT uses MSE of the scores). `layer_map` pairs layers ('uniform', 'last'
or explicit indices). Maps from models with other head counts are compared averaged over heads (`heads`: 'auto'
by default; 'match' refuses them, 'mean' always averages): a head-averaged map is still a distribution over keys,
so every attention loss applies to it.

Short form: `attention_weight`, `attention_loss`, `attention_layer_map`, `attention_heads`. Each pair is averaged over
the query positions the attention mask keeps, counted over the whole accumulation window; the term is the mean over
pairs (unit "mixed"). Needs eager attention (the trainer switches sdpa models, with a warning).
"""

from dataclasses import dataclass

import torch

from ..layer_map import LayerMapSpec, resolve_layer_map
from ..losses import ATTENTION_LOSSES
from ..streams import attention_streams
from ..units import masked_sum
from .base import Features, Needs, Term, TermBatch, register_term


@dataclass
class AttentionOptions:
    """Options of the `attention` term (short-form fields in brackets).

    Attributes:
        loss: 'kl' or 'mse', or a registered attention loss (`attention_loss`).
        layer_map: 'uniform', 'last' or one teacher layer index per student layer (`attention_layer_map`).
        heads: 'auto', 'match' or 'mean' (`attention_heads`).
    """

    loss: str = "kl"
    layer_map: LayerMapSpec = "uniform"
    heads: str = "auto"


@register_term("attention")
class AttentionTerm(Term):
    unit = "mixed"
    Options = AttentionOptions
    short_form = {
        "weight": "attention_weight",
        "loss": "attention_loss",
        "layer_map": "attention_layer_map",
        "heads": "attention_heads",
    }

    def __init__(self, options=None):
        super().__init__(options)
        self.pairs: dict[str, list[tuple[int, int]]] | None = None  # stream -> (student, teacher) layers
        self.head_mean = self.options.heads == "mean"

    def needs(self) -> Needs:
        return Needs(attentions=True)

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        s_streams = attention_streams(student.outputs, student.kind)
        t_streams = attention_streams(teacher.outputs, student.kind)
        if not s_streams or set(s_streams) != set(t_streams):
            raise ValueError(
                "attention_weight > 0, but the student or teacher returned no attention maps; load both with "
                "attn_implementation='eager' or set attention_weight=0."
            )
        pairs = {}
        for stream, s_maps in s_streams.items():
            t_maps = t_streams[stream]
            pairs[stream] = resolve_layer_map(
                self.options.layer_map,
                len(s_maps),
                len(t_maps),
                field_name="attention_layer_map",
                has_embeddings=False,
            )
            for s_idx, t_idx in pairs[stream]:
                s, t = s_maps[s_idx], t_maps[t_idx]
                heads_differ = s.shape[1] != t.shape[1]
                if s.shape[:1] + s.shape[2:] != t.shape[:1] + t.shape[2:] or (
                    heads_differ and self.options.heads == "match"
                ):
                    raise ValueError(
                        f"Attention maps differ in shape: student layer {s_idx} {tuple(s.shape)} vs teacher layer "
                        f"{t_idx} {tuple(t.shape)} ([batch, heads, query, key]). The attention term needs the same "
                        "tokens (same tokenizer or patches), and with attention_heads='match' the same number of "
                        "heads; set attention_heads='mean' to compare head-averaged maps, or attention_weight=0."
                    )
                if heads_differ:
                    self.head_mean = True
        self.pairs = pairs

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s_streams = attention_streams(student.outputs, student.kind)
        t_streams = attention_streams(teacher.outputs, student.kind)
        loss_fn = ATTENTION_LOSSES[self.options.loss]
        total, n = 0.0, 0
        for stream, pairs in self.pairs.items():
            for s_idx, t_idx in pairs:
                s_map, t_map = s_streams[stream][s_idx], t_streams[stream][t_idx]
                if self.head_mean:
                    s_map, t_map = s_map.mean(1, keepdim=True), t_map.mean(1, keepdim=True)
                per_query = loss_fn(s_map, t_map)
                total = total + masked_sum(per_query, batch.masks.get(stream)) / batch.counts[stream]
                n += 1
        return total / n
