"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017), activation-based.

For a conv feature map A of shape [C, H, W], the spatial attention map is (paper, section 3.1)

    F_sum^p(A) = sum_c |A_c|^p                      (p = 2 by default: the paper's main choice)

and Q = vec(F(A)) its flattening over the H*W positions. Eq. 2 of the paper adds, for the paired layers j,

    beta / 2 * sum_j || Q_S^j / ||Q_S^j||_2 - Q_T^j / ||Q_T^j||_2 ||_p         (p = 2: the norm, not squared)

with "beta = 10^3 divided by the number of elements in the attention map and the batch size". The official code
(github.com/szagoruyko/attention-transfer, utils.at_loss and cifar.py) computes instead, per layer pair,

    mean over examples and positions of (Q_S/||Q_S|| - Q_T/||Q_T||)^2,   times beta = 1000 (no 1/2),

i.e. the SQUARED distance divided by H*W: that is the variant that produced the paper's results, and it is this
term's default (`distance="mean_squared"`). Per example, the term is

    mean_squared:  sum_j (1 / max(H_j W_j, min_area)) * || q_S^j - q_T^j ||_2^2          (q = Q / ||Q||_2)
    norm:          sum_j || q_S^j - q_T^j ||_{norm_p}                      (eq. 2 literally, without beta / 2)

summed over the examples (unit "examples": the trainer divides by their number, giving the official code's mean over
the batch exactly when min_area = 1). Recommended weight: 1000 with the default `distance="mean_squared"` (the
official code's beta; the paper's beta / 2 form with the same beta would be 500). For `distance="norm"` the paper
gives no single value: its beta is 1000 / (H*W) per layer (the 1 / batch size is the trainer's mean), so start from
weight ~ 500 / (H*W). The official code averages the channels (x.pow(2).mean(1)) instead of summing them; after the
L2 normalisation the two are the same map.

Map area (`min_area`, default 64). The squared distance between two unit vectors lies in [0, 4] whatever the map's
size, so the official mean over positions makes a pair of H x W maps weigh 1000 / (H W) per unit of squared
distance: about 1 for CIFAR's 32 x 32 maps and 16 for its smallest, 8 x 8. The weight 1000 was tuned on those (WRN
groups at 32, 16 and 8). Over 4 x 4 and 2 x 2 maps (e.g. 28-pixel images after a stride-4 stem) the same weight is
62 and 250 per unit, 4-16 times CIFAR's strongest pair and 16-256 times its weakest; on Fashion-MNIST the term then
dominated the loss and cost 30 points of accuracy (benchmarks/METHODS.md). So the default divides by the map's
area but never by less than 64, CIFAR's smallest: no pair weighs more per unit of distance than any pair the
weight was tuned with, and on CIFAR-sized maps (8 x 8 and up) nothing changes. `min_area=1` is the official code
exactly (the paper's setting, one option away). Measured on that Fashion-MNIST pair (benchmarks/METHODS.md,
"Task-fitted defaults", one seed): the earlier default lost 33 pt against the labels alone, equal-resolution
pairing alone 22 pt, these defaults 5-9 pt (seeds 0-1; KD alone: 2 pt); better, but still a loss there.

Features: each model's `hidden_states` (transformers ResNet / ConvNeXt / ... return one [B, C, H, W] map per stage
with output_hidden_states=True; entry 0 is the stem's output), or the outputs of named submodules
(`student_modules` / `teacher_modules`, lists of names from `named_modules()`; needed for a plain nn.Module CNN,
which has no hidden_states). Each side's feature list is its module list when given, else its hidden_states.

Pairing (`layers`):
- 'resolution' (default): each student stage is paired with the last teacher stage of the same spatial size (the
  official code pairs the student's and teacher's groups of equal resolution, each group's output). A side's
  stages are its hidden_states without entry 0 (the stem, which the paper never matches), or all its named
  modules. A student stage whose size no teacher stage has is paired as 'uniform' pairs it (its map resized), with
  a warning naming both sizes: then give `layers` explicitly. E.g. a ResNet student with 7 x 7 and 4 x 4 stages
  of a teacher with 7 x 7, 4 x 4 and 2 x 2 stages pairs (1, 1) and (2, 2).
- 'uniform': the student's stages are spread over the teacher's with hfkd.layer_map.resolve_layer_map, whatever
  their sizes; e.g. a 2-stage student of a 3-stage teacher pairs hidden_states (1, 2) and (2, 3) (before
  'resolution' became the default, this was it: 7 x 7 with 4 x 4 and 4 x 4 with 2 x 2 in the example above).
- 'last': the last entry of each list.
- a list of (student_index, teacher_index) pairs, indices into each side's feature list (hidden_states index, 0 =
  stem; or position in the module list), e.g. [[1, 2], [2, 3]] or the string '1:2,2:3'.

The paper's setting, as the official code runs it: `min_area=1` with 'resolution' pairing on stages of equal
sizes; hfkd's earlier default was `layers='uniform', min_area=1`.

Channel counts may differ freely (the map sums over channels). Spatial sizes may differ: the student's attention
map F(A_S) is resized to the teacher's H x W bilinearly (align_corners=False, as F.interpolate) BEFORE the L2
normalisation; a 2x downsampling this way is exactly a 2x2 average. The teacher's map is never resized, so H*W in
`mean_squared` is the teacher's.
"""

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layer_map import resolve_layer_map
from .base import Features, Needs, Term, TermBatch, register_term

DISTANCES = ("mean_squared", "norm")
_NAMED = ("resolution", "uniform", "last")


def _parse_pairs(value) -> str | list[tuple[int, int]]:
    """`layers` -> 'uniform', 'last' or a list of (student, teacher) index pairs; errors name the option."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _NAMED:
            return text
        try:
            pairs = [tuple(int(x) for x in part.split(":")) for part in text.replace(" ", "").split(",") if part]
        except ValueError:
            pairs = None
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError(
                f"layers={value!r} is neither 'resolution', 'uniform', 'last' nor a list of student:teacher index "
                "pairs such as '1:2,2:3'."
            ) from None
        value = pairs
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"layers must be 'resolution', 'uniform', 'last' or a non-empty list of [student, teacher] pairs, got "
            f"{value!r}."
        )
    pairs = []
    for pair in value:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)
        ):
            raise ValueError(
                f"layers={value!r}: each entry must be a [student_index, teacher_index] pair of integers >= 0, "
                f"got {pair!r}."
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def _parse_names(value, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(n, str) and n for n in value):
        raise ValueError(
            f"{field_name} must be a non-empty list of submodule names (from named_modules()), got {value!r}."
        )
    return tuple(value)


@dataclass
class ATOptions:
    """Attention-transfer settings (see the module docstring). Recommended weight: 1000 (official code).

    Attributes:
        layers: 'resolution' (default: stages of the same spatial size), 'uniform', 'last', or
            [[student_index, teacher_index], ...] into each side's feature list.
        student_modules / teacher_modules: submodule names whose outputs are that side's feature list (instead of
            its hidden_states), e.g. a plain CNN's ['layer1', 'layer2', 'layer3'].
        p: exponent of the attention map sum_c |A_c|^p (paper: 2).
        distance: 'mean_squared' (official code: squared L2 distance / (H*W)) or 'norm' (eq. 2: ||.||_norm_p).
        norm_p: the norm of eq. 2, for distance='norm' (paper: 2).
        min_area: for distance='mean_squared', divide each pair's squared distance by max(H*W, min_area) (default
            64, CIFAR's smallest map: small maps are not weighted up; 1: the official code's mean over positions).
    """

    layers: str | list = "resolution"
    student_modules: list[str] | None = None
    teacher_modules: list[str] | None = None
    p: float = 2.0
    distance: str = "mean_squared"
    norm_p: float = 2.0
    min_area: int = 64

    def __post_init__(self):
        _parse_pairs(self.layers)
        _parse_names(self.student_modules, "student_modules")
        _parse_names(self.teacher_modules, "teacher_modules")
        for name in ("p", "norm_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        if self.norm_p < 1:
            raise ValueError(f"norm_p must be >= 1 (a norm), got {self.norm_p!r}.")
        if isinstance(self.min_area, bool) or not isinstance(self.min_area, int) or self.min_area < 1:
            raise ValueError(
                f"min_area must be an integer >= 1 (64: CIFAR's smallest map, the default; 1: the official code), "
                f"got {self.min_area!r}."
            )
        if self.distance not in DISTANCES:
            raise ValueError(f"distance={self.distance!r} is not known; choose one of {list(DISTANCES)}.")


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W]: sum over channels of |A_c|^p, in float32 at least."""
    features = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    return features.abs().pow(p).sum(1)


def at_distance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    p: float = 2.0,
    distance: str = "mean_squared",
    norm_p: float = 2.0,
    min_area: int = 1,
) -> torch.Tensor:
    """Per-example AT distance between two conv maps [B, C_s, H_s, W_s] and [B, C_t, H_t, W_t] -> [B]; `min_area`
    floors the area that 'mean_squared' divides by (1: the official code's mean over positions)."""
    q_s, q_t = attention_map(student, p), attention_map(teacher, p)
    if q_s.shape[-2:] != q_t.shape[-2:]:
        q_s = F.interpolate(q_s.unsqueeze(1), size=q_t.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    q_s = F.normalize(q_s.flatten(1), dim=1)
    q_t = F.normalize(q_t.flatten(1).to(q_s.dtype), dim=1)
    diff = q_s - q_t
    if distance == "mean_squared":
        return diff.pow(2).sum(1) / max(diff.shape[1], min_area)
    return torch.linalg.vector_norm(diff, ord=norm_p, dim=1)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _size(value) -> tuple[int, ...] | None:
    return tuple(value.shape[-2:]) if isinstance(value, torch.Tensor) and value.dim() == 4 else None


def _pair_by_resolution(s_list, t_list, first_t: int, uniform: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """layers='resolution': each student stage of `uniform` (the pairs 'uniform' gives) is paired instead with the
    last teacher stage of the same spatial size; a stage with no such teacher stage keeps its uniform partner, with
    a warning."""
    pairs, unmatched = [], []
    for s, t_uniform in uniform:
        size = _size(s_list[s])
        same = [t for t in range(first_t, len(t_list)) if size is not None and _size(t_list[t]) == size]
        if same:
            pairs.append((s, same[-1]))
        else:
            pairs.append((s, t_uniform))
            if size is not None and _size(t_list[t_uniform]) is not None:
                unmatched.append(
                    f"student {s} ({size[0]}x{size[1]}) with teacher {t_uniform} "
                    f"({_size(t_list[t_uniform])[0]}x{_size(t_list[t_uniform])[1]})"
                )
    if unmatched:
        warnings.warn(
            "at.layers='resolution': no teacher stage has the spatial size of some student stages, so they are paired "
            f"as 'uniform' pairs them, the student's attention map resized: {'; '.join(unmatched)}. Give at.layers "
            "explicitly (e.g. '1:2,2:3') to choose the pairs.",
            stacklevel=2,
        )
    return pairs


@register_term("at")
class AttentionTransfer(Term):
    unit = "examples"
    Options = ATOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._spec = _parse_pairs(self.options.layers)
        self._student_names = _parse_names(self.options.student_modules, "student_modules")
        self._teacher_names = _parse_names(self.options.teacher_modules, "teacher_modules")
        self._pairs: list[tuple[int, int]] | None = None

    def needs(self) -> Needs:
        return Needs(
            hidden_states=not (self._student_names and self._teacher_names),
            student_modules=self._student_names,
            teacher_modules=self._teacher_names,
        )

    def _features(self, side: Features, which: str) -> tuple[list[torch.Tensor], int]:
        """That side's feature list and the index of its first stage (1 for hidden_states: 0 is the stem)."""
        names = self._student_names if which == "student" else self._teacher_names
        if names:
            return [_first(side.modules[name]) for name in names], 0
        states = side.hidden_states
        if states is None:
            raise ValueError(
                f"The at term reads the {which}'s hidden_states, but the {which} returned none (a plain nn.Module?); "
                f"give {which}_modules, the names of the submodules whose outputs are its feature maps."
            )
        return list(states), 1 if len(states) > 1 else 0

    def _resolve(self, s_list, first_s: int, t_list, first_t: int) -> list[tuple[int, int]]:
        n_s, n_t = len(s_list), len(t_list)
        if self._spec == "last":
            return [(n_s - 1, n_t - 1)]
        if self._spec in ("uniform", "resolution"):
            stage_pairs = resolve_layer_map(
                "uniform", n_s - first_s, n_t - first_t, field_name="at.layers", has_embeddings=False
            )
            uniform = [(first_s + s, first_t + t) for s, t in stage_pairs]
            if self._spec == "uniform":
                return uniform
            return _pair_by_resolution(s_list, t_list, first_t, uniform)
        for s, t in self._spec:
            if s >= n_s or t >= n_t:
                raise ValueError(
                    f"at.layers pairs student index {s} with teacher index {t}, but the student has {n_s} and the "
                    f"teacher {n_t} feature maps (valid: student 0..{n_s - 1}, teacher 0..{n_t - 1})."
                )
        return list(self._spec)

    def _pairs_for(self, s_list, first_s, t_list, first_t) -> list[tuple[int, int]]:
        if self._pairs is None:
            self._pairs = self._resolve(s_list, first_s, t_list, first_t)
        return self._pairs

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        s_list, first_s = self._features(student, "student")
        t_list, first_t = self._features(teacher, "teacher")
        self._pairs = None
        for s, t in self._pairs_for(s_list, first_s, t_list, first_t):
            for which, index, value in (("student", s, s_list[s]), ("teacher", t, t_list[t])):
                if not isinstance(value, torch.Tensor) or value.dim() != 4:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"The at term needs conv feature maps [batch, channels, height, width], but the {which}'s "
                        f"feature {index} has shape {shape}; choose other at.layers or {which}_modules."
                    )

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s_list, first_s = self._features(student, "student")
        t_list, first_t = self._features(teacher, "teacher")
        options = self.options
        total = None
        device_type = s_list[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):  # the maps and norms in float32 at least
            for s, t in self._pairs_for(s_list, first_s, t_list, first_t):
                value = at_distance(
                    s_list[s], t_list[t].detach(), options.p, options.distance, options.norm_p, options.min_area
                )
                total = value if total is None else total + value
        return total.sum()
