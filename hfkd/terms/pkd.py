"""Patient knowledge distillation (Sun, Cheng, Gan & Liu, "Patient Knowledge Distillation for BERT Model
Compression", EMNLP 2019), the patient-teacher loss L_PT of PKD-Skip and PKD-Last.

For each example i and each paired layer j, h^{i,j} is the [CLS] (position 0) hidden state of that layer; the
student's M - 1 intermediate layers learn from M - 1 of the teacher's N layers (eq. 3 of the paper):

    L_PT = sum_i sum_j || h_s^{i,j} / ||h_s^{i,j}||_2 - h_t^{i,I_pt(j)} / ||h_t^{i,I_pt(j)}||_2 ||_2^2

and the objective is L_PKD = (1 - alpha) L_CE + alpha L_DS + beta L_PT (the task, logit and this term's weights).
The student's last layer is left to the logit term. Layer sets I_pt (hidden_states indices, 0 = embeddings):
- PKD-Skip (`layer_map="skip"`, default): student layer k learns from teacher layer round(k * N / M) (as
  hfkd.layer_map.resolve_layer_map 'uniform'); 6 of 12 layers: student 1..5 <- teacher 2, 4, 6, 8, 10.
- PKD-Last (`layer_map="last"`): student layer k <- teacher layer N - M + k; 6 of 12: teacher 7, 8, 9, 10, 11.
- an explicit list (or comma string) of teacher hidden_states indices, one per student layer used. A map shorter
  than the student pairs the student's FIRST len(map) layers with it: `4,8,12` pairs student hidden_states 1, 2, 3
  with teacher 4, 8, 12. `student_layers` gives the student's hidden_states indices explicitly instead (then it must
  have one entry per map entry; with 'skip' or 'last' it picks the student layers the rule is applied to).
By default the student's layers are 1 .. M - 1 for 'skip' and 'last' (the paper's), 1 .. len(map) for a list (which
may then reach the student's last layer M, as the user asked).

Pooling: 'cls' (paper; position 0), or 'mean' over the positions the attention mask keeps, or 'last' (the last kept
position, for decoders), via hfkd.terms.pooling.pool. If the student's and teacher's widths differ (the paper's
students have the teacher's width), setup() builds one linear projection (nn.Linear(d_s, d_t), with bias, as
hfkd's FitNets projections) per pair, applied to the student's pooled vector before the normalisation; they are
term state, trained with the student and saved in each checkpoint's hfkd_terms.safetensors, never in the student.

Weight: the paper grid-searches beta in {10, 100, 500, 1000}; the authors' released best runs (PKD-Skip, 6 layers)
mostly use beta = 100 (500 on RTE). Those betas belong to the official code's scale, not eq. 3's: the code
(intersun/PKD-for-BERT-Model-Compression, src/KD_loss.patience_loss) takes F.mse_loss of the normalised [batch,
pairs, width] tensors, i.e. the mean over examples, layers and the hidden width, not the sum of eq. 3, so eq. 3 as
written is (pairs x width) times stronger for the same beta: 5 x 768 = 3840 times for BERT-base 12 -> 6. Options:
- `reduction="mean"` (default): the code's scale, the one the paper's betas were searched on (per example: eq. 3
  divided by pairs x teacher width; with the trainer's mean over examples it equals F.mse_loss exactly).
  Recommended: weight = 100 (the paper's beta).
- `reduction="sum"`: eq. 3 as written, per example (hfkd's default before issue 21); the strength of the code's
  beta is then weight = beta / (pairs x teacher width), e.g. 100 / (5 x 768) ~ 0.026 for BERT-base 12 -> 6. With
  weight 100 it is pairs x width times what the paper ran (benchmarks/METHODS.md, "Task-fitted defaults", measures
  both on the tweets pair).
`normalize=False` drops the L2 normalisation (the code's --normalize_patience False, which some released runs used).

Unit: examples (the value is a sum over examples; the trainer divides by their number).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_map import parse_layer_map_spec, resolve_layer_map
from .base import Features, Needs, Term, TermBatch, register_term
from .pooling import POOLINGS, pool

_NAMED = ("skip", "last")
REDUCTIONS = ("sum", "mean")


def _parse_map(value) -> str | list[int]:
    if isinstance(value, str) and value.strip().lower() in _NAMED:
        return value.strip().lower()
    if isinstance(value, str) and value.strip().lower() == "uniform":
        raise ValueError(
            "layer_map='uniform' would also match the embeddings and the last layer; PKD's uniform map is 'skip' "
            "(or 'last', or a list of teacher hidden_states indices such as '2,4,6,8,10')."
        )
    spec = parse_layer_map_spec(value, "layer_map")
    if isinstance(spec, str):  # 'last' in parse_layer_map_spec's sense is handled above
        raise ValueError(f"layer_map={value!r} must be 'skip', 'last' or a list of teacher hidden_states indices.")
    return spec


def _parse_student_layers(value) -> list[int] | None:
    if value is None:
        return None
    spec = parse_layer_map_spec(value, "student_layers")
    if isinstance(spec, str):
        raise ValueError(f"student_layers={value!r} must be a list of student hidden_states indices such as '1,2,3'.")
    return spec


@dataclass
class PKDOptions:
    """PKD's patient loss (see the module docstring). Recommended: the default reduction='mean' with weight 100.

    Attributes:
        layer_map: 'skip' (PKD-Skip), 'last' (PKD-Last) or teacher hidden_states indices (list or '2,4,6').
        student_layers: the student's hidden_states indices (default: 1..M-1 for 'skip'/'last', 1..len(map)).
        pooling: 'cls' (paper), 'mean' (mask-aware) or 'last'.
        normalize: L2-normalise both vectors before the distance (paper: yes).
        reduction: 'mean' (default: the official code's scale, divided by pairs x teacher width, which the paper's
            betas belong to) or 'sum' (eq. 3 as written).
    """

    layer_map: str | list[int] = "skip"
    student_layers: str | list[int] | None = None
    pooling: str = "cls"
    normalize: bool = True
    reduction: str = "mean"

    def __post_init__(self):
        spec = _parse_map(self.layer_map)
        students = _parse_student_layers(self.student_layers)
        if students is not None and not isinstance(spec, str) and len(students) != len(spec):
            raise ValueError(
                f"student_layers has {len(students)} entries but layer_map has {len(spec)}; give one student "
                "hidden_states index per teacher index."
            )
        if students is not None and 0 in students:
            raise ValueError("student_layers holds 0, the embeddings output; PKD matches layers 1 and up.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not known; choose one of {list(POOLINGS)}.")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}.")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction={self.reduction!r} is not known; choose one of {list(REDUCTIONS)}.")


def pkd_pairs(spec, student_layers, num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden_states index pairs; `num_*` count hidden_states entries (layers + 1)."""
    layers_s, layers_t = num_student - 1, num_teacher - 1
    if isinstance(spec, str):
        if student_layers is None:
            student_layers = list(range(1, layers_s))
            if not student_layers:
                raise ValueError(
                    f"pkd: the student has {layers_s} layer(s), so PKD-{spec} has no intermediate layer to match (the "
                    "last one is left to the logit term); give layer_map as a list of teacher indices instead."
                )
        if spec == "skip":
            uniform = dict(
                resolve_layer_map("uniform", num_student, num_teacher, field_name="pkd.layer_map", has_embeddings=True)
            )
            pairs = [(k, uniform[k]) if k < num_student else (k, -1) for k in student_layers]
        else:
            pairs = [(k, layers_t - layers_s + k) for k in student_layers]
    else:
        if student_layers is None:
            if len(spec) > layers_s:
                raise ValueError(
                    f"pkd.layer_map has {len(spec)} entries but the student has only {layers_s} layers; give at most "
                    f"{layers_s} teacher indices (they pair with student layers 1, 2, ...) or set student_layers."
                )
            student_layers = list(range(1, len(spec) + 1))
        pairs = list(zip(student_layers, spec, strict=True))
    for s, t in pairs:
        if not 1 <= s < num_student:
            raise ValueError(
                f"pkd.student_layers refers to student hidden_states index {s}, but the student has {num_student} "
                f"entries (valid layers 1..{layers_s})."
            )
        if not 0 <= t < num_teacher:
            raise ValueError(
                f"pkd.layer_map pairs student layer {s} with teacher index {t}, but the teacher has {num_teacher} "
                f"hidden_states entries (valid 0..{layers_t})."
            )
    return pairs


@register_term("pkd")
class PatientKD(Term):
    unit = "examples"
    across_tokenizers = True
    Options = PKDOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._spec = _parse_map(self.options.layer_map)
        self._student_layers = _parse_student_layers(self.options.student_layers)
        self._pairs: list[tuple[int, int]] | None = None
        self.projections: nn.ModuleList | None = None

    def needs(self) -> Needs:
        return Needs(hidden_states=True)

    def teacher_hidden_layers(self, num_student: int, num_teacher: int) -> list[int]:
        pairs = pkd_pairs(self._spec, self._student_layers, num_student, num_teacher)
        return sorted({t % num_teacher for _, t in pairs})

    @staticmethod
    def _states(side: Features, which: str) -> tuple[torch.Tensor, ...]:
        states = side.hidden_states
        if states is None:
            raise ValueError(f"The pkd term reads the {which}'s hidden_states, but the {which} returned none.")
        return states

    def _pairs_for(self, s_states, t_states) -> list[tuple[int, int]]:
        if self._pairs is None:
            self._pairs = pkd_pairs(self._spec, self._student_layers, len(s_states), len(t_states))
        return self._pairs

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        s_states, t_states = self._states(student, "student"), self._states(teacher, "teacher")
        self._pairs = None
        widths = []
        for s, t in self._pairs_for(s_states, t_states):
            d_s = pool(s_states[s], batch.mask, self.options.pooling).shape[-1]
            d_t = pool(t_states[t], _teacher_mask(batch), self.options.pooling).shape[-1]
            widths.append((d_s, d_t))
        if any(d_s != d_t for d_s, d_t in widths):
            self.projections = nn.ModuleList(
                [nn.Linear(d_s, d_t) if d_s != d_t else nn.Identity() for d_s, d_t in widths]
            )

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s_states, t_states = self._states(student, "student"), self._states(teacher, "teacher")
        pairs = self._pairs_for(s_states, t_states)
        options = self.options
        total = None
        with torch.autocast(device_type=s_states[0].device.type, enabled=False):  # float32 at least
            for j, (s, t) in enumerate(pairs):
                h_s = pool(s_states[s], batch.mask, options.pooling)
                h_t = pool(t_states[t].detach(), _teacher_mask(batch), options.pooling)
                if self.projections is not None:
                    projection = self.projections[j]
                    if isinstance(projection, nn.Linear):
                        h_s = projection(h_s.to(projection.weight.dtype))
                if h_s.shape[-1] != h_t.shape[-1]:
                    raise ValueError(
                        f"pkd: student layer {s} has width {h_s.shape[-1]} and teacher layer {t} {h_t.shape[-1]}; "
                        "the projection between them is built in setup(), which the trainer runs on its probe batch."
                    )
                h_t = h_t.to(h_s.dtype)
                if options.normalize:
                    h_s, h_t = F.normalize(h_s, dim=-1), F.normalize(h_t, dim=-1)
                value = (h_s - h_t).pow(2).sum(-1)
                if options.reduction == "mean":
                    value = value / h_t.shape[-1]
                total = value if total is None else total + value
        if options.reduction == "mean":
            total = total / len(pairs)
        return total.sum()


def _teacher_mask(batch: TermBatch):
    # A teacher with its own tokenizer has its own padding.
    return batch.teacher_mask if batch.teacher_mask is not None else batch.mask
