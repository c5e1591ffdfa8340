"""The probe: two examples run through both models before training, and the plan they settle.

This is where mismatched vocabularies, layer maps, head counts and widths fail, before the first step, and where the
terms build their parameters (projections, heads) so that the optimizer and DDP know them from the start. It returns
a `StepPlan`: whether the head term runs on the output heads by chunks (`HeadPlan`), and whether the student's own
loss divides by `num_items_in_batch`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import checks
from .batch import probe_window
from .heads import accepts_logits_to_keep, base_module, capture_last_hidden, head_reproduces_logits, linear_head
from .models import unwrap_peft
from .terms.base import Features, logits_of

logger = logging.getLogger(__name__)


@dataclass
class HeadPlan:
    """The head term (`TermSet.head_term`) computed from final hidden states and linear heads, a chunk at a time.

    Attributes:
        term: the head term's name.
        student_base / student_head: the student's body (whose output is its last hidden state) and linear head.
        teacher_base / teacher_head: the teacher's; None when the probe read the teacher cache (its logits are read
            directly, and a batch without cached outputs computes the full logits).
    """

    term: str
    student_base: torch.nn.Module
    student_head: torch.nn.Linear
    teacher_base: torch.nn.Module | None = None
    teacher_head: torch.nn.Linear | None = None


@dataclass
class StepPlan:
    """What the probe settled for every step.

    Attributes:
        head: the chunked head term's plan, or None (the terms read the full logits).
        task_uses_num_items: the student's own loss divides by `num_items_in_batch` (see
            `DistillationStep.measure_task_normalisation`).
        probed: the probe ran (a trainer built without data probes on its first batch).
    """

    head: HeadPlan | None = None
    task_uses_num_items: bool = True
    probed: bool = False


def head_candidates(step, model, chunk_allowed: bool) -> HeadPlan | None:
    """Student and teacher heads, if a term can run on them by chunks (checked on real outputs by `probe`)."""
    head_term = step.term_set.head_term()
    kind = step.kind
    if head_term is None or not chunk_allowed or not (kind.shifts_labels and kind.token_level) or kind.encoder_decoder:
        return None
    student = unwrap_peft(step.unwrap(model))
    parts = [base_module(student), linear_head(student)]
    teacher_parts = step.source.head_parts()  # [] where the teacher's logits are stored (the cache)
    if teacher_parts is None or any(part is None for part in parts) or not accepts_logits_to_keep(student):
        logger.info("The logits are computed whole: a model has no plain linear head or no logits_to_keep.")
        return None
    return HeadPlan(head_term[0], *parts, *teacher_parts)


def probe(step, model, batch: dict, limits, *, require_labels: bool, chunk_allowed: bool, setup_terms) -> StepPlan:
    """Runs the student and the source's teachers on `batch` (two examples) without gradients and returns the plan.

    `limits`: (the student's `ModelLimits`, {teacher name: its}). `setup_terms(student_out, s_modules, teaching,
    t_modules, window)`: builds the terms from the real outputs (the trainer's: it knows the optimizer)."""
    student_limits, teacher_limits = limits
    for teacher in teacher_limits.values():
        checks.check_probe_batch(
            batch, student_limits, teacher, task_loss=step.settings.task_weight > 0, require_labels=require_labels
        )
    full, window = batch, probe_window(batch)  # the checks above read every token; the forwards a window
    candidate = head_candidates(step, model, chunk_allowed)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            step.source.evaluating(),
            capture_last_hidden(candidate.student_base if candidate else None) as s_last,
            capture_last_hidden(candidate.teacher_base if candidate else None) as t_last,
            step.capturing(model) as (s_modules, t_modules),
        ):
            student_in, teacher_in, _ = step.split_inputs(model, window)
            student_in.pop("labels", None)  # only shapes matter here, not the loss
            student_out = model(**student_in, **step.student_flags(model))
            teaching = step.source.outputs(window, teacher_in, step.flags(), False)
    finally:
        model.train(was_training)
    s_logits = logits_of(student_out)
    if s_logits is not None:
        # The class guess can be wrong for custom heads; the logits' rank is the truth.
        step.kind.token_level = s_logits.dim() >= 3
    setup_terms(student_out, s_modules, teaching, t_modules, window)
    # Two losses are compared there: the window only if it holds a label (a long prompt masks its first tokens).
    labels = window.get("labels")
    measured = window
    if labels is not None and hasattr(labels, "ne") and not bool(labels.ne(-100).any()):
        measured = full
    step.source.setup_terms(step, student_out, teaching, window, measured)
    plan = StepPlan(task_uses_num_items=step.measure_task_normalisation(model, measured), probed=True)
    if candidate is not None:
        plan.head = _checked_head(step, candidate, teaching, student_out, s_last.value, t_last.value, plan)
    return plan


def _checked_head(step, candidate: HeadPlan, teaching, student_out, s_hidden, t_hidden, plan) -> HeadPlan | None:
    """The candidate, if both heads reproduce the models' logits from their last hidden states."""
    teacher_out = next(iter(teaching.outputs.values())) if teaching else None
    stored = candidate.teacher_base is None  # the teacher's logits come from the cache, not from a head
    with step.source.whole_head():  # a sharded teacher's head is gathered (every process runs the probe)
        reproduced = head_reproduces_logits(s_hidden, candidate.student_head, logits_of(student_out)) and (
            stored or head_reproduces_logits(t_hidden, candidate.teacher_head, logits_of(teacher_out))
        )
    if reproduced and (step.settings.task_weight == 0 or plan.task_uses_num_items):
        return candidate
    logger.warning(
        "The student's or teacher's logits are not a plain linear head of its last hidden states "
        "(soft-capping or logit scaling?); the %s term uses the full logits (its chunk size is ignored).",
        candidate.term,
    )
    return None


def term_features(step, student_out, s_modules, teaching, t_modules):
    """The student's and each teacher's `Features` for the terms."""
    student = Features(student_out, s_modules, step.kind)
    outputs = teaching.outputs if teaching is not None else {}
    return student, {name: Features(out, t_modules.get(name, {}), step.kind) for name, out in outputs.items()}
