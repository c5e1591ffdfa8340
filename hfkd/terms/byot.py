"""Self-distillation through auxiliary heads (Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the
Performance of Convolutional Neural Networks via Self Distillation", ICCV 2019: BYOT).

The student is cut into sections; a classifier on each shallow section's output learns from the labels, from the
deepest classifier's softened distribution and from its feature. For a shallow exit i with logits q_i and feature F_i
(the deepest: the student's own logits q_C, detached, and F_C, its last layer's pooled hidden state, detached):

    L_i = (1 - alpha) CE(q_i, y) + alpha KL(softmax(q_C / T) || softmax(q_i / T)) + lambda ||F_i - F_C||^2

and the term is sum_i L_i over the shallow exits. The deepest classifier's own cross-entropy is the task loss
(`task_weight`); no teacher is read, so a run whose terms all read the student alone needs none
(hfkd.sources.StudentOnly): `DistillationTrainer(model=student, args=DistillationConfig(logit_weight=0,
terms=[{"name": "byot"}]))`.

Defaults are the authors' released code (ArchipLab-LinfengZhang/pytorch-self-distillation-final): T = 3, alpha = 0.3,
the KL without a T^2 factor (their soft cross-entropy has none; it differs from the KL by the teacher's entropy, a
constant). The paper gives lambda no value and that code has no hint term (lambda = 0 reproduces it); hfkd's default
lambda = 0.03 is a choice, with ||.||^2 taken as the mean over the feature's entries (as the `hidden` term's MSE) so
that it does not grow with the width.

Heads (hfkd.early_exit.ExitHead): the layer's hidden state pooled to one vector per example ([CLS] by default; mean
or last token; global average pooling for conv maps), LayerNorm, a linear bottleneck to F_C's width (the paper's
bottleneck, whose output is F_i) and a linear classifier. The paper puts its bottleneck of convolutions before the
pooling; a pooled LayerNorm + Linear head is the transformer counterpart, used for every model kind here. By default
the heads sit where the paper cuts a 4-section network, at the ends of its first three sections: layers
round(k L / 4), k = 1, 2, 3, of the student's L layers (`hidden_states` indices; a ResNet's stages), kept when
1 <= layer < L. The heads are this term's state (trained by the trainer's optimizer, saved in each checkpoint) and
are written beside the saved student, never inside it, for early exit (hfkd.early_exit.EarlyExitModel).

Units: the cross-entropy sums over the labelled rows and is divided by their count over the accumulation window (rows
without a label learn from the deepest classifier alone); the KL and the hint sum over the examples and are divided by
theirs (unit "mixed"). The student must be an example-level classifier (logits [batch, classes]).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..early_exit import ExitHead, save_exit_heads
from ..units import masked_sum
from .base import Features, Needs, Term, TermBatch, register_term
from .pooling import POOLINGS, pool


def default_exits(num_layers: int) -> list[int]:
    """The paper's cut of a 4-section network: the ends of the first three sections, round(k L / 4) (halves up)."""
    return sorted({math.floor(k * num_layers / 4 + 0.5) for k in (1, 2, 3)} & set(range(1, num_layers)))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class BYOTOptions:
    """Options of the `byot` term (the authors' code's defaults; see the module docstring).

    Attributes:
        layers: the student `hidden_states` indices that get a head (1 .. L-1; a ResNet's stages); None: the ends of
            the first three of four equal sections, round(k L / 4) for k = 1, 2, 3.
        pooling: how a layer's hidden states become one vector per example: 'cls' (the first position: BERT's [CLS],
            ViT's class token), 'mean' (over the positions the attention mask keeps) or 'last' (decoders); conv maps
            are averaged over their positions whatever this says.
        temperature: T of the softened distributions in the KL.
        alpha: the KL's share; the cross-entropy on the labels weighs 1 - alpha. In [0, 1].
        hint_weight: lambda of the feature hint ||F_i - F_C||^2 (mean over the feature's entries); 0 turns it off.
    Recommended weight: 1.
    """

    layers: list[int] | None = None
    pooling: str = "cls"
    temperature: float = 3.0
    alpha: float = 0.3
    hint_weight: float = 0.03

    def __post_init__(self):
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            if (
                not isinstance(layers, (list, tuple))
                or not layers
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in layers)
            ):
                raise ValueError(
                    f"layers must be a non-empty list of hidden_states indices >= 1 (0 is the embeddings, which have "
                    f"no layer to exit after), or None for the paper's sections; got {self.layers!r}."
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers lists a layer twice ({self.layers!r}); give each once.")
            self.layers = sorted(layers)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not known; choose one of {list(POOLINGS)}.")
        if not _number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}.")
        if not _number(self.alpha) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1] (the KL's share), got {self.alpha!r}.")
        if not _number(self.hint_weight) or self.hint_weight < 0:
            raise ValueError(
                f"hint_weight must be a finite number >= 0 (0: no feature hint), got {self.hint_weight!r}."
            )


@register_term("byot")
class BeYourOwnTeacher(Term):
    """sum_i L_i over the shallow exits (see the module docstring); the heads are built in setup()."""

    unit = "mixed"
    reads_teacher = False
    Options = BYOTOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.heads: nn.ModuleDict | None = None
        self.num_layers: int | None = None

    def needs(self) -> Needs:
        return Needs(logits=True, hidden_states=True, labels=True)

    def check_cache(self, cache) -> None:
        """It reads nothing of the teacher, so any cache serves it."""

    @property
    def exits(self) -> list[int]:
        return [int(layer) for layer in self.heads] if self.heads is not None else []

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        logits, states = student.logits, student.hidden_states
        if logits is None or logits.dim() != 2 or logits.shape[1] < 2:
            shape = None if logits is None else tuple(logits.shape)
            raise ValueError(
                f"byot puts a classifier at each exit, so the student must classify whole examples (logits [batch, "
                f"classes] with at least 2 classes), but its logits are {shape}; use a sequence or image classifier, "
                "or drop the term."
            )
        if states is None:
            raise ValueError(
                "byot reads the student's hidden_states (output_hidden_states=True), but the student returned none; "
                "use a transformers model, or drop the term."
            )
        if batch.labels is not None and (batch.labels.dim() != 1 or batch.labels.is_floating_point()):
            raise ValueError(
                f"byot's exits learn from class ids (labels [batch]), but the labels are {tuple(batch.labels.shape)} "
                f"{batch.labels.dtype}; it fits single-label classification only."
            )
        num_layers = len(states) - 1
        layers = self.options.layers if self.options.layers is not None else default_exits(num_layers)
        bad = [layer for layer in layers if not 1 <= layer < num_layers]
        if bad or not layers:
            raise ValueError(
                f"byot: layers={self.options.layers!r} gives exits {bad or layers}, but the student has {num_layers} "
                f"layers: a head fits after layers 1..{num_layers - 1} (layer {num_layers} is the student's own "
                "classifier). Choose layers in that range"
                + (" (a student of one layer has no shallow exit: drop the term)." if num_layers < 2 else ".")
            )
        deepest = states[-1]
        feature_width = pool(deepest, None, self.options.pooling).shape[-1]
        # float32 at least: heads on a bf16 student's features would train in bf16
        dtype = deepest.dtype if deepest.dtype == torch.float64 else torch.float32
        self.heads = nn.ModuleDict(
            {
                str(layer): ExitHead(
                    pool(states[layer], None, self.options.pooling).shape[-1],
                    feature_width,
                    logits.shape[1],
                    self.options.pooling,
                )
                for layer in layers
            }
        ).to(device=deepest.device, dtype=dtype)
        self.num_layers = num_layers

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        if self.heads is None:
            raise ValueError("byot builds its heads in setup(), which has not run.")
        options = self.options
        states = student.hidden_states
        if states is None or len(states) - 1 != self.num_layers:
            raise ValueError(
                f"byot's heads were built for a student of {self.num_layers} layers, but it returned "
                f"{None if states is None else len(states) - 1}."
            )
        dtype = next(iter(self.heads.values())).norm.weight.dtype
        examples = batch.counts.get("examples", torch.tensor(float(batch.num_examples)))
        labels = batch.labels
        with torch.autocast(device_type=states[-1].device.type, enabled=False):
            t = options.temperature
            log_p_deep = torch.log_softmax(student.logits.detach().to(dtype) / t, dim=-1)
            f_deep = pool(states[-1], batch.mask, options.pooling).detach().to(dtype)
            kl = hint = ce = 0.0
            for layer, head in self.heads.items():
                f_i, q_i = head(states[int(layer)], batch.mask)
                log_p_i = torch.log_softmax(q_i / t, dim=-1)
                kl = kl + (log_p_deep.exp() * (log_p_deep - log_p_i)).sum()
                if options.hint_weight > 0:
                    hint = hint + (f_i - f_deep).pow(2).mean(-1).sum()
                if labels is not None and options.alpha < 1:
                    labelled = labels.ne(-100)
                    per_row = F.cross_entropy(
                        q_i, torch.where(labelled, labels, torch.zeros_like(labels)), reduction="none"
                    )
                    ce = ce + masked_sum(per_row, labelled)
            value = (options.alpha * kl + options.hint_weight * hint) / examples
            if labels is not None and options.alpha < 1:
                count = batch.counts.get("labelled")
                count = count if count is not None else labels.ne(-100).sum().clamp_min(1)
                value = value + (1 - options.alpha) * ce / count
        return value

    def save_beside_student(self, directory: str) -> list[str]:
        if self.heads is None:
            return []
        return save_exit_heads(directory, {int(layer): head for layer, head in self.heads.items()}, self.num_layers)
