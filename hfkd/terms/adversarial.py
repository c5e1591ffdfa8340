"""Adversarial distillation: a discriminator learns to tell the teacher's outputs from the student's, and the student
learns to fool it (Xu, Hsu & Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge Distillation
with Conditional Adversarial Networks", ICLR 2018 workshop, arXiv 1709.00513 (first titled "Learning Loss for
Knowledge Distillation with Conditional Adversarial Networks"); Wang, Xu, Xu & Tao, "Adversarial Learning of Portable
Student Networks", AAAI 2018).

Both papers cast distillation as a GAN whose generator is the student: for an input x, the teacher's output t(x) is
"real", the student's s(x) is "fake", and a discriminator D (here an MLP that ends in one logit a = D(v), so that
D's probability of "teacher" is sigma(a)) plays the game of Goodfellow et al. (2014, eq. 1)

    min_student max_D  E_x[ log sigma(D(t(x))) + log(1 - sigma(D(s(x)))) ].

Xu et al. feed D the logits (they present D as a loss function learned for distillation; "conditional" in their
title: the generated output is conditioned on the input x, as in a conditional GAN); Wang et al. feed it features
of the two networks. Both add the GAN loss beside the usual terms (task loss, KD), as this term is.

What this term computes, per unit i (a row, or a counted position of a token-level head; see `unit` below), with
v^T_i the teacher's input to D (detached: the teacher is never trained) and v^S_i the student's:

    L_D,i = BCE(D(v^T_i), r) + BCE(D(v^S_i), 0) = [r softplus(-a^T_i) + (1 - r) softplus(a^T_i)] + softplus(a^S_i)

with r = `real_label` (1: the plain GAN; below 1: one-sided label smoothing, Salimans et al. 2016). The term's value
is sum_i L_D,i, the discriminator's loss, and that is what `distill/adversarial` logs: 2 ln 2 = 1.386 per unit when D
cannot tell the two apart (sigma = 1/2 everywhere), towards 0 when D wins. The min-max runs in the trainer's one
backward pass and one optimizer, with no second loop:

- D's parameters receive w x dL_D/dtheta_D / count (w the term's weight): gradient descent on its own loss, as a
  discriminator step;
- the student receives, through its input to D, `generator_loss`:
  * `"minimax"` (default; the papers' objective as written): a gradient reversal layer (Ganin & Lempitsky 2015) on
    v^S multiplies the gradient flowing back into the student by -lambda (lambda = `generator_scale`). The student
    therefore follows -lambda w dL_D/dv^S = lambda w d/dv^S log(1 - sigma(a^S)): it minimises
    lambda log(1 - D(s)), i.e. maximises D's loss. This is the saturating form: its gradient, -lambda sigma(a^S)
    da^S/dv^S, vanishes when D confidently rejects the student (sigma(a^S) -> 0), early in training typically.
  * `"non_saturating"`: the student minimises lambda (-log sigma(D(v^S))) = lambda softplus(-a^S) instead
    (Goodfellow et al.'s practical recommendation), gradient -lambda (1 - sigma(a^S)) da^S/dv^S, largest exactly when
    D rejects the student. In one backward: D's loss reads D(v^S detached), so only D learns from it; the generator
    loss reads a second pass D_frozen(v^S) through D's weights detached, so only the student learns from it; the
    value adds lambda (L_G - L_G.detach()), which is exactly 0 in the forward (the logged value stays L_D) and
    contributes exactly lambda dL_G to the backward.

With gradient accumulation and DDP this needs nothing special: the sign flip and the split are in the autograd
graph of each micro-batch, the sums are divided by the window's unit count like every other term's, and DDP (which
wraps the terms' module) averages D's gradients over processes as it does the student's.

Options (`AdversarialOptions`):
- `reads`: what D sees. `"logits"` (default; Xu et al.): the raw logit vectors; `"probabilities"`: softmax(z / T)
  with T = `temperature`; `"pooled"` (Wang et al.): one pooled feature vector per example (`PooledFeatureOptions`:
  `layer`, `pooling`, `student_module`, `teacher_module`). When the pooled widths differ, a linear projection maps
  the student's vector to the teacher's width; it sits on the student's side of the reversal, so it trains as part of
  the generator (to fool D), never as part of D.
- `hidden_size`, `num_layers`, `negative_slope`: D = `num_layers` linear layers (the last to one logit) with leaky
  ReLUs of that slope between them; no batch norm, so that D scores each row on its own and the teacher's and the
  student's rows never share statistics.
- `condition_on_labels`: D also reads the label as a one-hot vector concatenated to its input (a conditional
  discriminator, Mirza & Osindero 2014): it then asks whether an output is the teacher's for this class. Rows (or
  positions) labelled -100 get a zero vector. Logits or probabilities only.
- `generator_loss`, `generator_scale`: above. `real_label`: above.

Defaults. Neither paper's reference code is public, and their full text could not be read from this project's
machine, so the discriminator's size and the papers' extra terms were NOT verified: Xu et al. describe D as a
multilayer perceptron over logits and the student as trained to produce logits D cannot tell from the teacher's; the
widths, depth, optimiser, any auxiliary class output of D and the relative weights they use are not reproduced
here. The defaults (3 linear layers of width 256, leaky ReLU slope 0.2 as in DCGAN's discriminator, the minimax
objective, lambda = 1, r = 1, no label conditioning) are this implementation's choices. D trains with the student's
optimizer, learning rate and schedule (no second optimizer); the trainer's gradient clipping clips the student's
and D's gradients by their joint norm. Neither paper uses a Wasserstein critic, so no weight clipping applies.
Recommended weight: 1, beside KD (`logit_weight`) and the task loss.

Unit: `"logits"` for logits and probabilities (the positions the logit term counts: one per example for
classification heads, labelled positions for token-level heads, shifted for causal LMs), `"examples"` for pooled
features; the trainer divides the sum by that count over the accumulation window and all processes, so accumulation
equals one big batch. Token-level heads are scored at every position and the uncounted ones masked out (no
data-dependent indexing, so no host sync). Computed in float32 at least (float64 inputs stay float64), autocast off.
State: D's (and the projection's) parameters, trained, clipped, saved in each checkpoint's hfkd_terms.safetensors,
restored on resume, never part of the exported student. A teacher cache serves this term when it holds the teacher's
full logits (`reads` logits or probabilities: any cache of a classification head built with this term configured,
or `--top_k 0`), or the pooled hidden-state layer (`reads: pooled`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..units import masked_sum
from .base import Features, Needs, Term, TermBatch, cache_error, register_term
from .pooling import PooledFeatureOptions, pooled

READS = ("logits", "probabilities", "pooled")
GENERATOR_LOSSES = ("minimax", "non_saturating")
IGNORE_INDEX = -100


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class AdversarialOptions(PooledFeatureOptions):
    """What the discriminator reads and how the game is played (see the module docstring).

    Attributes:
        reads: 'logits' (default), 'probabilities' (softmax at `temperature`) or 'pooled' (features, pooled per
            example by the PooledFeatureOptions fields `layer`, `pooling`, `student_module`, `teacher_module`).
        temperature: T of softmax(z / T) for reads='probabilities'.
        hidden_size: width of the discriminator's hidden layers.
        num_layers: linear layers of the discriminator (>= 1; 1 is a logistic regression on the input).
        negative_slope: slope of the leaky ReLUs between them.
        generator_loss: 'minimax' (gradient reversal: the student maximises D's loss) or 'non_saturating' (the
            student minimises -log D(student)).
        generator_scale: lambda, the factor on the student's adversarial gradient (the reversal's scale), >= 0.
        condition_on_labels: D also reads the one-hot label (rows labelled -100: zeros); logits or probabilities.
        real_label: D's target for the teacher's outputs, in (0.5, 1] (below 1: one-sided label smoothing).
    Recommended weight: 1.
    """

    reads: str = "logits"
    temperature: float = 1.0
    hidden_size: int = 256
    num_layers: int = 3
    negative_slope: float = 0.2
    generator_loss: str = "minimax"
    generator_scale: float = 1.0
    condition_on_labels: bool = False
    real_label: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.reads not in READS:
            raise ValueError(f"reads={self.reads!r} is not known; choose one of {list(READS)}.")
        if self.reads != "pooled" and (self.student_module or self.teacher_module):
            raise ValueError(
                f"student_module / teacher_module name features to pool, but reads={self.reads!r}; set "
                "reads: pooled, or drop them."
            )
        if not _number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}.")
        if not _positive_int(self.hidden_size):
            raise ValueError(f"hidden_size must be an integer >= 1, got {self.hidden_size!r}.")
        if not _positive_int(self.num_layers):
            raise ValueError(
                f"num_layers must be an integer >= 1 (1: a logistic regression), got {self.num_layers!r}."
            )
        if not _number(self.negative_slope) or self.negative_slope < 0:
            raise ValueError(f"negative_slope must be a finite number >= 0, got {self.negative_slope!r}.")
        if self.generator_loss not in GENERATOR_LOSSES:
            raise ValueError(
                f"generator_loss={self.generator_loss!r} is not known; choose one of {list(GENERATOR_LOSSES)}."
            )
        if not _number(self.generator_scale) or self.generator_scale < 0:
            raise ValueError(f"generator_scale must be a finite number >= 0, got {self.generator_scale!r}.")
        if not isinstance(self.condition_on_labels, bool):
            raise ValueError(f"condition_on_labels must be true or false, got {self.condition_on_labels!r}.")
        if self.condition_on_labels and self.reads == "pooled":
            raise ValueError(
                "condition_on_labels needs the number of classes, which pooled features do not give; set reads: "
                "logits (or probabilities), or condition_on_labels: false."
            )
        if not _number(self.real_label) or not 0.5 < self.real_label <= 1:
            raise ValueError(f"real_label must be a number in (0.5, 1], got {self.real_label!r}.")


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by -scale (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * -ctx.scale, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` unchanged; the gradient that flows back through it is multiplied by -scale."""
    return _ReverseGradient.apply(x, scale)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float = 1.0) -> torch.Tensor:
    """Per unit: BCE(sigma(a^T), r) + BCE(sigma(a^S), 0) from D's logits, as softplus (no log of 0)."""
    real = real_label * F.softplus(-real_logits)
    if real_label != 1.0:
        real = real + (1.0 - real_label) * F.softplus(real_logits)
    return real + F.softplus(fake_logits)


@register_term("adversarial")
class AdversarialDistillation(Term):
    """The discriminator's loss per unit, summed; the student gets the generator's gradient (module docstring)."""

    unit = "logits"
    across_tokenizers = True
    Options = AdversarialOptions

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.reads == "pooled":
            self.unit = "examples"  # one pooled vector per example (TermSet reads the unit from the instance)
        self.discriminator: nn.Sequential | None = None
        self.project: nn.Linear | None = None

    def needs(self) -> Needs:
        if self.options.reads == "pooled":
            return self.options.pooled_needs()
        return Needs(logits=True, labels=self.options.condition_on_labels)

    def teacher_hidden_layers(self, num_student: int, num_teacher: int) -> list[int] | None:
        # The pooling options exist for reads='pooled' only: reading logits, the term needs no hidden state cached.
        return super().teacher_hidden_layers(num_student, num_teacher) if self.options.reads == "pooled" else None

    def check_cache(self, cache) -> None:
        if self.options.reads == "pooled":
            return super().check_cache(cache)
        if cache.logits is None or cache.logits.get("mode") != "dense":
            held = "its top-k only" if cache.logits else "no logits"
            raise cache_error(
                f"The term 'adversarial' reads the teacher's full logits (reads: {self.options.reads}), but the "
                f"teacher cache holds {held}; rebuild it with `hfkd cache` with this term configured (and --top_k 0 "
                "for a head with more classes than top_k), set reads: pooled, or drop teacher_cache_dir."
            )
        return None

    # ------------------------------------------------------------------ inputs
    def _inputs(self, student: Features, teacher: Features, batch: TermBatch):
        """(student rows, teacher rows, condition or None, mask or None): `[..., width]` inputs of D whose leading
        dims are the units (`[batch]`, or `[batch, positions]` for token-level heads); no host sync."""
        options = self.options
        if options.reads == "pooled":
            s = pooled(student, batch, options, "student", "adversarial").flatten(1)
            t = pooled(teacher, batch, options, "teacher", "adversarial").flatten(1)
            return s, t, None, None
        s, t = student.logits, teacher.logits
        for side, value in (("student", s), ("teacher", t)):
            if value is None:
                raise ValueError(
                    f"The adversarial term reads logits (reads: {options.reads}), but the {side} returned none; set "
                    "reads: pooled (with student_module / teacher_module for models without hidden_states), or drop "
                    "the term."
                )
        labels, mask = batch.labels, None
        if s.dim() == 3:  # token-level heads: one distribution per position
            if student.kind.shifts_labels:  # a causal LM's position p predicts label p + 1
                s, t = s[:, :-1], t[:, :-1]
                labels = labels[:, 1:] if labels is not None and labels.dim() == 2 else labels
            mask = batch.logit_mask
        elif s.dim() != 2:
            raise ValueError(
                f"The adversarial term reads logits of shape [batch, classes] or [batch, positions, classes], got "
                f"{list(s.shape)}; set reads: pooled."
            )
        if options.reads == "probabilities":
            dtype = torch.promote_types(s.dtype, torch.float32)  # float64 stays float64
            s = torch.softmax(s.to(dtype) / options.temperature, dim=-1)
            t = torch.softmax(t.to(dtype) / options.temperature, dim=-1)
        condition = None
        if options.condition_on_labels:
            if labels is None or labels.shape != s.shape[:-1]:
                got = "none" if labels is None else f"shape {list(labels.shape)}"
                raise ValueError(
                    f"condition_on_labels: the adversarial term needs one label per unit, shape {list(s.shape[:-1])}, "
                    f"got {got}; give the data (and the evaluation data) a label column, or set "
                    "condition_on_labels: false."
                )
            # A comparison, not F.one_hot, which reads the labels' maximum on the host; -100 matches no class.
            classes = torch.arange(s.shape[-1], device=labels.device)
            condition = labels.unsqueeze(-1) == classes
        return s, t, condition, mask

    # ------------------------------------------------------------------ state
    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        options = self.options
        if options.reads != "pooled" and batch.alignment is not None and student.kind.token_level:
            raise ValueError(
                "The adversarial term compares logits position by position, but the teacher has its own tokenizer "
                "(teacher_processing_class) and its token-level logits do not line up with the student's; set "
                "reads: pooled."
            )
        labels, logits = batch.labels, student.logits
        if options.condition_on_labels and labels is not None and logits is not None:
            # Checked here, on the probe batch, so that forward needs no host read of the labels.
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= logits.shape[-1]))
            if bool(bad.any()):
                raise ValueError(
                    f"condition_on_labels: labels must be class ids in [0, {logits.shape[-1]}) or -100, got "
                    f"{labels[bad].tolist()[:5]} on the probe batch; set condition_on_labels: false."
                )
        s, t, condition, _ = self._inputs(student, teacher, batch)
        if options.reads == "pooled":
            if s.shape[-1] != t.shape[-1]:
                self.project = nn.Linear(s.shape[-1], t.shape[-1])  # the student's side: trained to fool D
        else:
            what = "vocabulary" if s.dim() == 3 else "number of labels"
            if s.shape[-1] != t.shape[-1]:
                raise ValueError(
                    f"The adversarial term reads logits (reads: {options.reads}) and needs the same {what} in both "
                    f"models: the student has {s.shape[-1]} outputs, the teacher {t.shape[-1]}. Set reads: pooled, or "
                    "use a student with the teacher's labels or vocabulary."
                )
            if s.shape != t.shape:
                raise ValueError(
                    f"The adversarial term: student logits {list(s.shape)} and teacher logits {list(t.shape)} do not "
                    "line up; both models must see the same tokens (same tokenizer and padding)."
                )
        width = t.shape[-1] + (condition.shape[-1] if condition is not None else 0)
        layers: list[nn.Module] = []
        for index in range(options.num_layers):
            last = index == options.num_layers - 1
            layers.append(nn.Linear(width if index == 0 else options.hidden_size, 1 if last else options.hidden_size))
            if not last:
                layers.append(nn.LeakyReLU(options.negative_slope))
        self.discriminator = nn.Sequential(*layers)

    # ------------------------------------------------------------------ the value
    def _score(self, inputs: torch.Tensor, condition: torch.Tensor | None, frozen: bool = False) -> torch.Tensor:
        """D's logit per unit, `[...]`. `frozen`: through D's weights detached (the generator's pass: only the
        inputs get gradients)."""
        x = inputs if condition is None else torch.cat((inputs, condition.to(inputs.dtype)), dim=-1)
        for layer in self.discriminator:
            if isinstance(layer, nn.Linear):
                weight, bias = (layer.weight.detach(), layer.bias.detach()) if frozen else (layer.weight, layer.bias)
                x = F.linear(x, weight, bias)
            else:
                x = layer(x)
        return x.squeeze(-1)

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        if self.discriminator is None:
            raise ValueError(
                "The adversarial term builds its discriminator in setup(), on the probe batch; call it first."
            )
        options = self.options
        dtype = self.discriminator[0].weight.dtype
        device = self.discriminator[0].weight.device
        with torch.autocast(device_type=device.type, enabled=False):
            s, t, condition, mask = self._inputs(student, teacher, batch)
            s, t = s.to(dtype), t.detach().to(dtype)
            if self.project is not None:
                s = self.project(s)
            real = self._score(t, condition)
            scale = float(options.generator_scale)
            if options.generator_loss == "minimax":
                fake = self._score(reverse_gradient(s, scale), condition)
                per_unit = discriminator_loss(real, fake, options.real_label)
            else:
                per_unit = discriminator_loss(real, self._score(s.detach(), condition), options.real_label)
                generator = F.softplus(-self._score(s, condition, frozen=True))  # -log sigma(D(v^S))
                per_unit = per_unit + scale * (generator - generator.detach())  # 0 forward, lambda dL_G backward
        return masked_sum(per_unit, mask)
