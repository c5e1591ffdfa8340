"""`logit`: the student's output distribution against the teacher's (response-based knowledge).

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network": the default loss is
T^2 KL(softmax(z_t / T) || softmax(z_s / T)) per position, at temperature T = 2 here (the paper tries 1-20; 2-4 is
common for language models). Other losses: reverse KL, the generalised Jensen-Shannon divergence of GKD
(Agarwal et al., 2024) with `jsd_beta`, or MSE of the raw logits (see `hfkd.losses`). `standardize` z-scores both
models' logits over the classes first (Sun et al., CVPR 2024).

Short form: `logit_weight`, `logit_loss`, `temperature`, `jsd_beta`, `logit_chunk_size`, `logit_standardize`.
The value is a sum over the positions the logits count (labels != -100, shifted for causal LMs; one per example
for classification heads), so the trainer divides it by their count over the whole accumulated batch.

For causal LMs with plain linear heads the trainer asks `head_loss` instead of `forward`: the divergence (and the
student's own next-token loss, which needs the same logits) is computed from both models' final hidden states a
chunk of positions at a time, so the `[batch, sequence, vocabulary]` logits are never held. Loss and gradients equal
the full computation (tested), and forward KL, reverse KL and JSD without standardisation use their closed-form
gradients (hfkd.losses.fused).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import logit_mismatch_error
from ..losses import LOGIT_LOSSES
from ..losses.chunked import chunked_head_loss
from ..losses.fused import kl_ce_with_grad
from ..losses.logits import standardize_logits
from ..losses.topk import topk_logit_loss
from ..units import masked_sum
from .base import Features, Needs, Term, TermBatch, cache_error, register_term


@dataclass
class LogitOptions:
    """Options of the `logit` term (short-form fields in brackets).

    Attributes:
        loss: 'kl', 'reverse_kl', 'jsd', 'mse' or a registered logit loss (`logit_loss`).
        temperature: softmax temperature of the divergences, > 0 (`temperature`).
        jsd_beta: 'jsd' interpolation in [0, 1] (`jsd_beta`).
        chunk_size: causal LMs: positions per chunk of the head-fused path; 0 = full logits (`logit_chunk_size`).
        standardize: z-score both models' logits before the temperature (`logit_standardize`).
    """

    loss: str = "kl"
    temperature: float = 2.0
    jsd_beta: float = 0.5
    chunk_size: int = 128
    standardize: bool = False


def _cached_topk(outputs):
    # A teacher cache of a large vocabulary holds (ids, log_probs) of the top-k classes (hfkd.cache).
    return None if isinstance(outputs, torch.Tensor) else getattr(outputs, "topk", None)


@register_term("logit")
class LogitTerm(Term):
    unit = "logits"
    across_tokenizers = True
    across_modalities = True
    Options = LogitOptions
    short_form = {
        "weight": "logit_weight",
        "loss": "logit_loss",
        "temperature": "temperature",
        "jsd_beta": "jsd_beta",
        "chunk_size": "logit_chunk_size",
        "standardize": "logit_standardize",
    }

    def needs(self) -> Needs:
        return Needs(logits=True)

    def check_cache(self, cache) -> None:
        # Dense or top-k logits both serve it; the cache checked loss and temperature against the config already.
        if cache.logits is None:
            raise cache_error("logit_weight > 0, but the teacher cache holds no logits; rebuild it with a logit term.")

    def head_chunk_size(self) -> int:
        return self.options.chunk_size

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        s_logits, t_logits = student.logits, teacher.logits
        if batch.alignment is not None and student.kind.token_level:
            raise ValueError(
                "The teacher has its own tokenizer (teacher_processing_class), so the two models' token-level logits "
                "do not line up position by position nor id by id: use the cross-tokenizer terms instead, "
                "terms=[{'name': 'span_kd'}] or [{'name': 'uld'}], and set logit_weight=0."
            )
        topk = _cached_topk(teacher.outputs)
        what = "vocabulary" if student.kind.token_level else "number of labels"
        if topk is not None:
            if self.options.standardize:
                raise cache_error(
                    "logit_standardize needs the teacher's full logits, but the teacher cache holds its top-k only; "
                    "rebuild it with `hfkd cache --top_k 0`, or drop logit_standardize."
                )
            classes = teacher.outputs.num_classes
            if s_logits is None or s_logits.shape[-1] != classes:
                raise logit_mismatch_error(what, -1 if s_logits is None else s_logits.shape[-1], classes)
            if s_logits.shape[:-1] != topk[0].shape[:-1]:
                raise cache_error(
                    f"Student logits {tuple(s_logits.shape)} and cached top-k {tuple(topk[0].shape)} do not line up; "
                    "the cache must be built from the same tokenized data."
                )
            return
        if s_logits is None or t_logits is None:
            raise ValueError("logit_weight > 0, but the student or teacher returned no `logits`.")
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise logit_mismatch_error(what, s_logits.shape[-1], t_logits.shape[-1])
        if s_logits.shape != t_logits.shape:
            raise ValueError(
                f"Student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)} do not line "
                "up; both models must see the same tokens (same tokenizer and padding)."
            )

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        options = self.options
        s, t = student.logits, teacher.logits
        topk = _cached_topk(teacher.outputs)
        shift = student.kind.shifts_labels and s.dim() == 3
        if topk is not None:
            ids, log_probs = (topk[0][:, :-1], topk[1][:, :-1]) if shift else topk
            per_position = topk_logit_loss(
                options.loss,
                s[:, :-1] if shift else s,
                ids,
                log_probs,
                temperature=options.temperature,
                beta=options.jsd_beta,
            )
            return masked_sum(per_position, batch.logit_mask)
        if shift:
            s, t = s[:, :-1], t[:, :-1]
        if options.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        per_position = LOGIT_LOSSES[options.loss](s, t, temperature=options.temperature, beta=options.jsd_beta)
        return masked_sum(per_position, batch.logit_mask)

    def head_loss(
        self,
        s_hidden: torch.Tensor,
        s_head: torch.nn.Linear,
        teacher,
        t_head: torch.nn.Linear | None,
        mask: torch.Tensor | None,
        coef,
        labels: torch.Tensor | None = None,
        task_scale=None,
    ):
        """This term (and the student's own next-token loss), from final hidden states and linear heads, by chunks.

        Args:
            s_hidden: the student's final hidden states `[batch, sequence, width]`.
            s_head: the student's output head.
            teacher: the teacher's final hidden states (online, with `t_head`), or its cached outputs (`logits`, or
                `topk = (ids, log_probs)`; `t_head` None).
            mask: the positions that count, `[batch, sequence - 1]` (labels != -100, shifted), or None: all.
            coef: what the summed term is multiplied by in the loss (weight / count).
            labels: the labels, for the student's cross-entropy when `task_scale` is given.
            task_scale: what the summed cross-entropy is multiplied by in the loss; None: no task part.

        Returns:
            (loss with gradients, the term's sum, the cross-entropy's sum or None), the sums detached.
        """
        options = self.options
        chunks = _LogitChunks(options, s_hidden, teacher, t_head, mask, coef, labels, task_scale)
        if chunks.closed:
            fused = chunked_head_loss(
                chunks.s_rows, s_head.weight, s_head.bias, chunks.closed_form, options.chunk_size, with_gradient=True
            )
        else:
            fused = chunked_head_loss(chunks.s_rows, s_head.weight, s_head.bias, chunks.chunk_loss, options.chunk_size)
        return fused, chunks.sums["term"], chunks.sums.get("task")


def _next_token_rows(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows that predict a token: position t predicts token t + 1, so the last position has no target."""
    values = values[:, :-1]
    return values[mask] if mask is not None else values.flatten(0, 1)


class _LogitChunks:
    """`LogitTerm.head_loss` on one batch: both models' selected rows, and the loss of a chunk of them for
    `chunked_head_loss` (`closed_form` with its gradient, or `chunk_loss` through autograd), adding the detached
    sums of the term and of the task loss to `sums` as the chunks go."""

    def __init__(self, options: LogitOptions, s_hidden, teacher, t_head, mask, coef, labels, task_scale):
        self.options, self.coef, self.task_scale = options, coef, task_scale
        self.s_rows = _next_token_rows(s_hidden, mask)
        self.topk = None if isinstance(teacher, torch.Tensor) else teacher.topk
        if self.topk is not None:
            self.t_ids, self.t_log_probs = _next_token_rows(self.topk[0], mask), _next_token_rows(self.topk[1], mask)
        elif isinstance(teacher, torch.Tensor):
            self.t_rows = _next_token_rows(teacher, mask)
        else:  # cached dense logits: the rows are logits already
            self.t_rows, t_head = _next_token_rows(teacher.logits, mask), None
        self.t_head = t_head

        self.with_task = task_scale is not None and isinstance(labels, torch.Tensor)
        if self.with_task:
            self.targets = labels[:, 1:][mask] if mask is not None else labels[:, 1:].flatten()
        self.sums = {"term": torch.zeros((), device=self.s_rows.device)}
        if self.with_task:
            self.sums["task"] = torch.zeros((), device=self.s_rows.device)
        self.targets_all_valid = mask is not None  # rows were selected by labels != -100

        # Forward KL, reverse KL and JSD (and cross-entropy) have known gradients: no autograd over [rows, vocab].
        closed = options.loss in ("kl", "reverse_kl", "jsd") and not options.standardize
        self.closed = closed and (self.topk is None or options.loss == "kl")
        # Online, the teacher's hidden states are divided by T before its head: logits / T at 1/V of the cost.
        self.scaled_teacher = (
            self.closed
            and self.topk is None
            and t_head is not None
            and t_head.bias is None
            and options.temperature != 1.0
        )
        if self.scaled_teacher:
            self.t_rows = self.t_rows / options.temperature

    def teacher_logits(self, start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            return self.t_head(self.t_rows[start:end]) if self.t_head is not None else self.t_rows[start:end]

    def closed_form(self, s_logits: torch.Tensor, start: int, end: int):
        """(this chunk's loss, its gradient with respect to `s_logits`) in closed form (hfkd.losses.fused)."""
        options, with_task = self.options, self.with_task
        distill, task, grad = kl_ce_with_grad(
            s_logits,
            temperature=options.temperature,
            kl_scale=self.coef,
            teacher_logits=self.teacher_logits(start, end) if self.topk is None else None,
            teacher_scaled=self.scaled_teacher,
            topk=(self.t_ids[start:end], self.t_log_probs[start:end]) if self.topk is not None else None,
            targets=self.targets[start:end] if with_task else None,
            ce_scale=self.task_scale if with_task else 0.0,
            targets_all_valid=self.targets_all_valid,
            loss=options.loss,
            beta=options.jsd_beta,
        )
        self.sums["term"] += distill
        total = distill * self.coef
        if with_task:
            self.sums["task"] += task
            total = total + task * self.task_scale
        return total, grad

    def chunk_loss(self, s_logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """This chunk's loss through autograd, where no closed form applies (standardised logits, other losses than
        'kl', 'reverse_kl' and 'jsd', or a top-k teacher with another loss than 'kl')."""
        options = self.options
        if self.topk is not None:
            distill = topk_logit_loss(
                options.loss,
                s_logits,
                self.t_ids[start:end],
                self.t_log_probs[start:end],
                temperature=options.temperature,
                beta=options.jsd_beta,
            ).sum()
        else:
            s_view, t_logits = s_logits, self.teacher_logits(start, end)
            if options.standardize:  # the divergence sees z-scores; the task loss below keeps the raw logits
                s_view, t_logits = standardize_logits(s_view), standardize_logits(t_logits)
            distill = LOGIT_LOSSES[options.loss](
                s_view, t_logits, temperature=options.temperature, beta=options.jsd_beta
            ).sum()
        self.sums["term"] += distill.detach()
        total = distill * self.coef
        if self.with_task:
            task = F.cross_entropy(s_logits.float(), self.targets[start:end], ignore_index=-100, reduction="sum")
            self.sums["task"] += task.detach()
            total = total + task * self.task_scale
        return total
