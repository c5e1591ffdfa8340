"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022).

For one example with target class t and logits z over C classes, softened at temperature T,

    p_i = exp(z_i / T) / sum_j exp(z_j / T)                          (all classes)
    b = [p_t, p_\\t],  p_\\t = 1 - p_t                               (target vs the rest: a binary distribution)
    p^_i = exp(z_i / T) / sum_{j != t} exp(z_j / T),  i != t          (the non-target classes, renormalised)

and the paper rewrites classical KD as KD = KL(b^T || b^S) + (1 - p_t^T) KL(p^^T || p^^S) (Sec. 3.1). DKD drops
the coupling factor (1 - p_t^T) and weights the two parts freely:

    TCKD = KL(b^T || b^S)      = sum_{k in {t, \\t}} b^T_k log(b^T_k / b^S_k)
    NCKD = KL(p^^T || p^^S)    = sum_{i != t} p^^T_i log(p^^T_i / p^^S_i)
    DKD  = alpha * T^2 * TCKD + beta * T^2 * NCKD

(the T^2 factors are those of the paper's code, as in Hinton et al.'s KD). The log-probabilities are taken from
log-sum-exps, log p_t = z_t / T - LSE(z / T) and log p_\\t = LSE_{j != t}(z_j / T) - LSE(z / T), so no probability
is rounded to 0 or 1 before its log.

Defaults. The paper's CIFAR-100 setting (its official code, mdistiller) is alpha = 1.0, beta = 8.0, T = 4.0, the
DKD loss added to the student's cross-entropy with weight 1.0: use `weight = 1.0` for this term beside the task
term, and `logit_weight = 0` (DKD replaces the classical logit term). Some CIFAR-100 pairs use smaller beta
(e.g. beta = 2 for ResNet56 -> ResNet20). On ImageNet the paper uses beta = 0.5 and T = 1.0 (alpha = 1.0) with a
warm-up of 1 epoch.

This term's defaults are the paper's ImageNet setting: alpha = 1.0, beta = 0.5, T = 1.0. Why not CIFAR-100's:
hfkd's benchmark (benchmarks/METHODS.md, "Task-fitted defaults") ran DKD on Fashion-MNIST (10 classes), a ResNet
and a ViT student, seeds 0-2, against the same student trained on the labels alone. beta = 8, T = 4 lost 13-17 pt;
the class-count rule below lost 3.5-6.9 pt at every seed; the ImageNet setting gained +0.44, +0.28, +0.02 pt (ResNet
student) and +1.56, +1.29, +0.93 pt (ViT student), never below the labels alone. With beta = 8, T = 4 the NCKD
part's gradient on the student's logits was measured at 5-8 times the cross-entropy's at 10 classes and 9-16 times
at 3 (hfkd issue 21), against about 2 on CIFAR-100: on few classes a far smaller non-target weight fits. On 3
classes (tweets) the ImageNet setting was not measured; the rule below lost 1.1 pt there.

The paper's other setting and the earlier rule stay one option away:
- `beta = 8.0, temperature = 4.0`: CIFAR-100 (the paper's main table and mdistiller's default);
- `beta = "auto"` (with `temperature = 4.0`): beta fitted to the number of classes C (the logits' last dimension),

    beta(C) = 8 * sqrt(min(C - 1, 99) / 99)          (dkd_beta_for_classes)

  i.e. 8 at 100 classes or more, 2.41 at 10, 1.14 at 3, which keeps the NCKD / CE gradient ratio near CIFAR-100's
  (a test checks this on synthetic logits). It was this term's default before the measurement above.

Search: `hfkd.search.kd_space` searches beta in [0.25, 8] and T in [1, 8] (log-uniform) besides the term's weight
(`search_space`): the paper's own two settings lie at the corners of that range, and which one fits depends on the
data (the number of classes above).

Warm-up: the paper warms the DKD loss up linearly, min(epoch / 20, 1), over the first 20 epochs on
CIFAR-100: `warmup_steps = n` multiplies the term by min(s / n, 1) at its s-th training forward (s = 1, 2, ...),
counted by a buffer that checkpoints save and restore. It counts training micro-batches: with
gradient_accumulation_steps = k, set n = k x the optimizer steps wanted (CIFAR-100 at batch 64: 20 epochs =
20 x 782 steps); the micro-batches of one window then get slightly different factors. Evaluation uses factor 1
(the un-warmed loss), so evaluation losses stay comparable over a run. `warmup_steps = 0` (default): no warm-up.

Unit: labelled (hfkd.terms.base): each labelled example's (or, for token-level heads, each labelled position's)
DKD is summed and the trainer divides by their number over the accumulated batch (and all processes), so
accumulation equals one big batch. DKD needs each example's target class: a row whose label is -100 (a transfer row,
hfkd's "data without labels") gives 0 and does not count, so the term is the mean over the labelled rows only,
exactly as the task loss is, however the labelled rows fall across micro-batches; a window without any labelled row
gives 0. For token-level heads (token classification, masked and causal LMs: logits `[batch, positions, vocabulary]`, labels
`[batch, positions]`) it is the positions whose label is not -100, and a causal LM's logits at position t are
compared at label t + 1, as the logit term and the model's own loss do. `dkd_per_item` works on any leading shape.
"""

import math
from dataclasses import dataclass

import torch

from .base import Features, Needs, Term, TermBatch, register_term

IGNORE_INDEX = -100


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


AUTO = "auto"
PAPER_BETA = 8.0  # CIFAR-100, the setting beta = "auto" reproduces at 100 classes
IMAGENET_BETA, IMAGENET_TEMPERATURE = 0.5, 1.0  # the paper's ImageNet setting: the defaults
PAPER_CLASSES = 100


def dkd_beta_for_classes(num_classes: int) -> float:
    """beta = "auto": 8 * sqrt(min(C - 1, 99) / 99), the paper's CIFAR-100 beta scaled so that the NCKD part's
    gradient stays near its CIFAR-100 ratio to the cross-entropy's (see the module docstring)."""
    if num_classes < 2:
        raise ValueError(f"dkd needs at least 2 classes, got {num_classes}.")
    return PAPER_BETA * math.sqrt(min(num_classes - 1, PAPER_CLASSES - 1) / (PAPER_CLASSES - 1))


@dataclass
class DKDOptions:
    """alpha (TCKD weight), beta (NCKD weight), temperature and warm-up (see the module docstring).

    Attributes:
        alpha: TCKD weight (paper: 1.0).
        beta: NCKD weight (default 0.5, the paper's ImageNet setting; 8.0 on CIFAR-100), or "auto": fitted to the
            number of classes by dkd_beta_for_classes, 8 at 100 classes or more, 2.41 at 10, 1.14 at 3.
        temperature: T (default 1.0, the paper's ImageNet setting; 4.0 on CIFAR-100).
        warmup_steps: linear warm-up over this many training forwards (0: none).
    The paper's loss weight is 1.0 (the term's `weight`).
    """

    alpha: float = 1.0
    beta: float | str = IMAGENET_BETA
    temperature: float = IMAGENET_TEMPERATURE
    warmup_steps: int = 0

    def __post_init__(self):
        if isinstance(self.beta, str) and self.beta.strip().lower() == AUTO:
            self.beta = AUTO
        elif isinstance(self.beta, str):
            raise ValueError(
                f"beta={self.beta!r} is not known: give a number >= 0 (the paper: 8.0 on CIFAR-100, 0.5 on ImageNet) "
                'or "auto" (fitted to the number of classes).'
            )
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if name == "beta" and value == AUTO:
                continue
            if not _number(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: the dkd term would always be 0. Set alpha or beta > 0.")
        if not _number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0 (0: no warm-up), got {self.warmup_steps!r}.")


def dkd_per_item(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., C]` logits and `[...]` labels -> (T^2 * TCKD, T^2 * NCKD), each `[...]`; 0 where the label is -100.

    Computed in float32 at least (float64 inputs stay float64), outside autocast. Needs C >= 2; with C = 2 the
    non-target distribution has one class and NCKD is 0.
    """
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.to(dtype) / temperature
        t = teacher_logits.detach().to(dtype) / temperature
        valid = labels != IGNORE_INDEX
        target = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(-1)
        is_target = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, target, True)

        def log_parts(z):
            lse = torch.logsumexp(z, dim=-1)
            lse_rest = torch.logsumexp(z.masked_fill(is_target, float("-inf")), dim=-1)
            log_b = torch.stack((z.gather(-1, target).squeeze(-1) - lse, lse_rest - lse), dim=-1)
            # log p^_i for i != t; 0 at the target, so that its entry adds exp(0) * (0 - 0) = 0 below.
            log_hat = (z - lse_rest.unsqueeze(-1)).masked_fill(is_target, 0.0)
            return log_b, log_hat

        log_b_s, log_hat_s = log_parts(s)
        log_b_t, log_hat_t = log_parts(t)
        tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1)
        nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).sum(-1)
        scale = temperature * temperature
        zero = torch.zeros((), dtype=dtype, device=s.device)
        return torch.where(valid, tckd * scale, zero), torch.where(valid, nckd * scale, zero)


@register_term("dkd")
class DecoupledKD(Term):
    """alpha * TCKD + beta * NCKD per labelled example (see the module docstring), summed over the micro-batch."""

    unit = "labelled"
    across_tokenizers = True
    across_modalities = True
    Options = DKDOptions
    search_space = {"beta": (0.25, 8.0), "temperature": (1.0, 8.0)}

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.warmup_steps > 0:
            # Training forwards so far; a buffer, so checkpoints save it and resuming continues the warm-up.
            self.register_buffer("warmup_count", torch.zeros((), dtype=torch.long))

    def needs(self) -> Needs:
        return Needs(logits=True, labels=True)

    def _inputs(self, student: Features, teacher: Features, batch: TermBatch):
        """Shape checks only (no host sync): the logits of both models and the labels."""
        s, t = student.logits, teacher.logits
        if s is None or t is None:
            raise ValueError("dkd needs both models' logits, but a model returned none.")
        labels = batch.labels
        if labels is None:
            raise ValueError(
                "dkd needs the labels (each example's target class), but the batch has none; evaluation data needs "
                "a label column too."
            )
        if s.dim() == 3 and labels.dim() == 2:
            # Token-level heads: one distribution per position. A causal LM's position t predicts label t + 1.
            if student.kind.shifts_labels:
                s, t, labels = s[:, :-1], t[:, :-1], labels[:, 1:]
            return self._check(s, t, labels.reshape(-1), flat=True)
        if s.dim() != 2:
            raise ValueError(
                f"dkd needs logits of shape [batch, classes] (or [batch, positions, classes] with labels of shape "
                f"[batch, positions]), got {list(s.shape)}."
            )
        return self._check(s, t, labels, flat=False)

    def _check(self, s, t, labels, flat: bool):
        if flat:
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        if t.shape != s.shape:
            raise ValueError(
                f"dkd compares the student's and the teacher's class distributions: their logits must have the same "
                f"shape, got student {list(s.shape)} and teacher {list(t.shape)} (the same labels, in the same order)."
            )
        if s.shape[-1] < 2:
            raise ValueError(
                f"dkd needs at least 2 classes (a target and the rest), got logits with {s.shape[-1]} (a regression "
                "head?)."
            )
        if labels.shape != s.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"dkd needs one integer class id per example, labels of shape {list(s.shape[:1])}; got "
                f"{labels.dtype} labels of shape {list(labels.shape)} (multi-label or regression targets?)."
            )
        return s, t, labels

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        if batch.alignment is not None and student.kind.token_level:
            raise ValueError(
                "dkd compares logits class by class, but the teacher has its own tokenizer (teacher_processing_class) "
                "and its token-level logits do not line up with the student's; use span_kd or uld instead."
            )
        s, _, labels = self._inputs(student, teacher, batch)
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= s.shape[-1]))
        if bool(bad.any()):
            raise ValueError(
                f"dkd: labels must be class ids in [0, {s.shape[-1]}) or -100, got {labels[bad].tolist()} on the "
                "probe batch."
            )

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s, t, labels = self._inputs(student, teacher, batch)
        options = self.options
        tckd, nckd = dkd_per_item(s, t.detach(), labels, options.temperature)
        beta = dkd_beta_for_classes(s.shape[-1]) if options.beta == AUTO else options.beta
        value = (options.alpha * tckd + beta * nckd).sum()
        if options.warmup_steps > 0 and batch.training:
            self.warmup_count += 1
            value = value * (self.warmup_count.to(value.dtype) / options.warmup_steps).clamp(max=1.0)
        return value
