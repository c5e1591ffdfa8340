"""`DistillationStep`: one batch -> (loss, the values to log, the student's outputs). Testable without a Trainer.

In the order the code reads (`__call__`):
1. the batch is split into the student's and the teachers' inputs (`split_inputs`);
2. the source gives each teacher's outputs (hfkd.sources); the teachers run first, before the student: measured, a
   teacher's forward is about 20% slower behind the student's activations;
3. the student runs once, with what the terms need (its own task loss through the `task_loss` it was given; for
   example-level classification heads, over the window's labelled rows: `labelled_task_loss`);
4. units: each term's count over the accumulation window (hfkd.units, counted when the window starts);
5. mixing, with several teachers (hfkd.mixing), at each response term's own temperature;
6. each term returns its value, normalised over its unit; the head term runs on the output heads by chunks when the
   probe planned it (hfkd.probe);
7. loss = sum of weight x value (plus the loss of models that learn too: peers).
What runs after the optimizer step (the mean teacher's update) is the source's callback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .augment import MIX_LABELS, MIX_LAMBDA, mixed_cross_entropy
from .batch import SPANS, TEACHER_SPANS, student_inputs, teacher_inputs, teacher_key
from .heads import capture_last_hidden
from .mixing import TeacherMixer
from .models import forward_keywords, output_value, unwrap_peft
from .probe import StepPlan
from .sources import TeacherSource
from .terms.base import Features, TermBatch, TokenAlignment, logits_of
from .terms.runner import ROW_IDS_KEY, TermSet, capture_modules, resolve_modules
from .units import WindowUnits, batch_size, masked_sum, unit_masks

_OUTPUT_FEATURE_KEYS = (
    "hidden_states",
    "attentions",
    "encoder_hidden_states",
    "decoder_hidden_states",
    "encoder_attentions",
    "decoder_attentions",
    "cross_attentions",
)


@dataclass
class StepResult:
    """A step's loss (with gradients), each logged value by name (`task`, `distill/<term>`, `<peer>/...`) and the
    student's outputs."""

    loss: torch.Tensor
    logged: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: object = None


@dataclass
class TaskLossSettings:
    """How the student's own loss is normalised, as Trainer does it (read by the chunked head path).

    Attributes:
        task_weight: the task term's weight (`DistillationConfig.task_weight`).
        accepts_loss_kwargs: Trainer passes `num_items_in_batch` to the student's forward.
        process_scale: Trainer's factor for `average_tokens_across_devices` (processes / tensor-parallel size), else 1.
        label_smoothing: Trainer's `label_smoothing_factor` where its label smoother is on, else 0 (read by the
            task loss over labelled rows, `DistillationStep.labelled_task_loss`).
    """

    task_weight: float = 1.0
    accepts_loss_kwargs: bool = False
    process_scale: int = 1
    label_smoothing: float = 0.0


class DistillationStep:
    """Computes one step's loss from a batch: the teachers' outputs from `source`, the student's forward, the terms.

    `task_loss(model, inputs, num_items_in_batch, training, accepts=None, uses_num_items=None) -> (loss, outputs)`:
    a model's own loss on the labels, scaled over the accumulation window (the trainer gives Trainer's path, so that
    task-only training is exactly Trainer's). `accumulation_steps()`: micro-batches in the current window.
    """

    def __init__(
        self,
        term_set: TermSet,
        source: TeacherSource,
        mixer: TeacherMixer,
        units: WindowUnits,
        task_loss: Callable,
        settings: TaskLossSettings,
        accumulation_steps: Callable[[], int] = lambda: 1,
        unwrap: Callable = lambda model: model,
        prediction_loss_only: bool = False,
    ):
        self.term_set, self.source, self.mixer, self.units = term_set, source, mixer, units
        self.task_loss, self.settings = task_loss, settings
        self.accumulation_steps, self.unwrap = accumulation_steps, unwrap
        self.prediction_loss_only = prediction_loss_only
        self.plan = StepPlan()
        self.terms_module: torch.nn.Module = term_set  # its DDP wrapper, when the terms train parameters
        self.matched_vocab = None  # (student ids, teacher ids) of shared tokens, with two tokenizers
        self.num_rows: int | None = None  # rows in train_dataset, when terms keep a memory per row
        self.task_loss_is_custom = False  # a `compute_loss_func` computes the task loss (Trainer's)
        self._hooked: dict[str, dict[str, torch.nn.Module]] = {}  # side -> the submodules the terms read
        self._student_takes: tuple[frozenset[str], bool] | None = None
        # Mixup / cutmix of this batch (hfkd.augment): (each row's partner label, lam per row), or None. Set by each
        # call, read by labelled_task_loss (the student's task loss, and the peers').
        self.mix: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def kind(self):
        return self.units.kind

    @property
    def distills(self) -> bool:
        return len(self.term_set) > 0

    # ---------------------------------------------------------------- inputs and outputs
    def split_inputs(self, model, inputs: dict) -> tuple[dict, dict, dict]:
        """Student inputs, teacher inputs (no labels; `teacher_*` keys renamed), and the full batch for masks."""
        inputs = dict(inputs)
        student = student_inputs(inputs)
        derived = {}
        if self.kind.encoder_decoder and "labels" in student and "decoder_input_ids" not in student:
            # Both models must decode the same sequence; derive it once from the labels as the models would.
            prepare = getattr(unwrap_peft(self.unwrap(model)), "prepare_decoder_input_ids_from_labels", None)
            if prepare is not None:
                derived["decoder_input_ids"] = student["decoder_input_ids"] = prepare(labels=student["labels"])
        teacher = teacher_inputs({**inputs, **derived})
        return student, teacher, inputs

    def flags(self) -> dict[str, bool]:
        """The `output_*` flags the terms need (a teacher's call leaves out those its forward does not take)."""
        return dict(self.term_set.flags())

    def student_flags(self, model) -> dict[str, bool]:
        # A plain nn.Module student (forward(pixel_values) -> logits) takes no output flags; the terms then read its
        # submodules, and one that needs its hidden states says so in its own error.
        if self._student_takes is None:
            self._student_takes = forward_keywords(unwrap_peft(self.unwrap(model)))
        names, takes_kwargs = self._student_takes
        flags = self.flags()
        return flags if takes_kwargs else {k: v for k, v in flags.items() if k in names}

    @contextlib.contextmanager
    def capturing(self, model):
        """Records the submodule outputs the terms asked for during the forwards inside the block:
        (student's, {teacher name: its})."""
        with contextlib.ExitStack() as stack:
            student = stack.enter_context(self._capture("student", model))
            teachers = {
                name: stack.enter_context(self._capture(name, self.source.model(name)))
                for name in self.term_set.teachers
            }
            yield student, teachers

    def _capture(self, side: str, model):
        if side not in self._hooked:
            if side == "student":
                names, role = self.term_set.needs().student_modules, "student"
            else:
                names = self.term_set.teacher_modules(side)
                role = "teacher" if len(self.term_set.teachers) < 2 else f"teacher {side!r}"
            model = unwrap_peft(self.unwrap(model)) if model is not None and names else model
            self._hooked[side] = resolve_modules(model, names, role)
        return capture_modules(self._hooked[side])

    def term_batch(self, batch: dict, training: bool, masks: dict | None = None, counts: dict | None = None):
        """The batch as the terms see it (hfkd.terms.base.TermBatch)."""
        masks = masks if masks is not None else unit_masks(batch, self.kind)
        counts = counts if counts is not None else self.units.normalisers(masks, batch, False)[0]
        labels, rows = batch.get("labels"), batch.get(ROW_IDS_KEY)
        alignment = None
        if isinstance(batch.get(SPANS), torch.Tensor):  # a teacher with its own tokenizer (hfkd.two_tokenizers)
            matched = self.matched_vocab or (None, None)
            alignment = TokenAlignment(
                student=batch[SPANS],
                teacher=batch[TEACHER_SPANS],
                student_ids=batch["input_ids"],
                teacher_ids=batch[teacher_key("input_ids")],
                matched_student=matched[0],
                matched_teacher=matched[1],
            )
        teacher_mask = batch.get(teacher_key("attention_mask")) if alignment is not None else None
        return TermBatch(
            teacher_mask=teacher_mask.bool() if isinstance(teacher_mask, torch.Tensor) else None,
            alignment=alignment,
            labels=labels if isinstance(labels, torch.Tensor) else None,
            mask=masks.get(self.units.stream),
            num_examples=batch_size(batch),
            logit_mask=masks.get("logit"),
            row_ids=rows if isinstance(rows, torch.Tensor) else None,
            training=training,
            num_rows=self.num_rows,
            masks=masks,
            counts=counts,
        )

    def measure_task_normalisation(self, model, batch: dict, accepts: bool | None = None) -> bool:
        """Whether `model`'s own loss divides by `num_items_in_batch` (the student's, or a peer's).

        Trainer assumes every model that takes `**kwargs` does, and then skips its division by the accumulation
        steps (and multiplies by the number of processes). Many heads (BERT's, T5's) return a per-batch mean
        anyway, which would make the task term `gradient_accumulation_steps` (x processes) times too large next to
        the distillation terms. Two evaluations with different counts settle it.
        """
        accepts = self.settings.accepts_loss_kwargs if accepts is None else accepts
        if self.settings.task_weight == 0 or not accepts or self.task_loss_is_custom:
            return True
        inputs, _, _ = self.split_inputs(model, batch)
        if "labels" not in inputs:
            return True
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = [
                    output_value(model(**inputs, num_items_in_batch=torch.tensor(count)), "loss")
                    for count in (1.0, 2.0)
                ]
        finally:
            model.train(was_training)
        if all(isinstance(loss, torch.Tensor) for loss in losses):
            return not torch.allclose(losses[0], losses[1])
        return True

    # ---------------------------------------------------------------- the step
    def __call__(self, model, inputs: dict, num_items_in_batch=None, modules=None) -> StepResult:
        """The step's loss on `inputs`; `modules`: what `capturing(model)` recorded, around this call."""
        training = model.training
        s_modules, t_modules = modules if modules is not None else ({}, {})
        student_in, teacher_in, batch = self.split_inputs(model, inputs)
        mix = batch.get(MIX_LABELS), batch.get(MIX_LAMBDA)
        self.mix = mix if all(isinstance(v, torch.Tensor) for v in mix) else None
        flags = self.student_flags(model)
        head = self.plan.head
        chunked = (
            head is not None
            and self.distills
            and self.source.serves_head(batch, head)
            and (training or self.prediction_loss_only)  # evaluation that returns logits needs them whole
            and "shift_labels" not in student_in
        )
        teaching = None
        if self.distills:
            teaching = self.source.outputs(
                batch,
                teacher_in,
                self.flags(),
                training,
                head=head if chunked else None,
                step=self,
                student_inputs=student_in,
                num_items_in_batch=num_items_in_batch,
            )
        chunked = chunked and teaching is not None

        logged: dict[str, torch.Tensor] = {}
        if chunked:
            plain = {k: v for k, v in student_in.items() if k != "labels"}
            with capture_last_hidden(head.student_base) as s_last:
                outputs = model(**plain, **flags, logits_to_keep=1)
        elif self.settings.task_weight > 0:
            logged["task"], outputs = self.task_loss(model, {**student_in, **flags}, num_items_in_batch, training)
        else:
            outputs = model(**{k: v for k, v in student_in.items() if k != "labels"}, **flags)

        fused, learners = None, None
        if teaching is None and self.mix is not None and "task" in logged:
            # No teacher (task loss alone): the mixed labels' loss, as the model's mean over the micro-batch's
            # labelled rows (Trainer's unit) divided by the accumulation steps.
            labels = student_in["labels"]
            per_row = self._mixed_rows(logits_of(outputs), labels)
            logged["task"] = per_row.sum() / labels.ne(-100).sum().clamp_min(1)
            logged["task"] = logged["task"] / self.accumulation_steps() if training else logged["task"]
        if teaching is not None:
            masks = unit_masks(batch, self.kind)
            counts, scale = self.units.normalisers(masks, batch, training)
            if chunked:
                fused, values = self._head_loss(
                    s_last.value,
                    next(iter(teaching.head_inputs.values())),
                    student_in.get("labels"),
                    masks["logit"],
                    counts,
                    scale,
                    num_items_in_batch,
                    training,
                )
                logged.update(values)
            student = Features(outputs, s_modules, self.kind)
            teachers = {
                name: Features(out, t_modules.get(name, {}), self.kind) for name, out in teaching.outputs.items()
            }
            if "task" in logged:
                own = self.labelled_task_loss(model, outputs, student_in.get("labels"), counts, scale)
                if own is None and self.mix is not None:
                    raise ValueError(
                        "augment mixes labels (mixup, cutmix), which needs a single-label classifier's logits "
                        "[batch, classes]; use 'crop,flip' for this student."
                    )
                logged["task"] = own if own is not None else logged["task"]
            mixed, teacher_weights = self.mixer.mix(self.term_set, teachers, batch)
            term_batch = self.term_batch(batch, training, masks, counts)
            raw = self.terms_module(
                student,
                teachers,
                term_batch,
                skip=head.term if chunked else None,
                mixed=mixed,
                teacher_weights=teacher_weights,
            )
            logged.update(self.units.normalise(raw, self.term_set, counts, scale, training, self.accumulation_steps()))
            if teaching.learners_loss is not None:
                learners, values = teaching.learners_loss(outputs, term_batch, scale, training)
                logged.update(values)

        loss = self._weighted_sum(logged, fused, head.term if fused is not None else None)
        if learners is not None:
            loss = learners if loss is None else loss + learners
        if loss is None:  # evaluation with neither task loss nor teacher: nothing to report but zero
            loss = torch.zeros((), device=next(model.parameters()).device)
        return StepResult(loss, logged, outputs)

    def labelled_task_loss(self, model, outputs, labels, counts: dict, scale: float) -> torch.Tensor | None:
        """The task loss of an example-level classification head over the labelled rows of the window, or None where
        the model's own loss (by Trainer's path) stands.

        Trainer's path gives the model's mean over the labelled rows of each micro-batch, divided by the number of
        micro-batches: a micro-batch with few labelled rows then weighs as much as one full of them, and one with
        none gives NaN. Here the cross-entropy is summed over the rows whose label is not -100 and divided by the
        labelled rows of the whole window and all processes (`counts["labelled"]`, at least 1), like every term's
        unit: accumulation equals one big batch, and a window without a label gives 0. Label smoothing is Trainer's
        (`LabelSmoother` and `cross_entropy(label_smoothing=...)` compute the same per row). Only where the model's
        loss is that cross-entropy: class ids `[batch]`, logits `[batch, classes]`, no `compute_loss_func`, no
        regression or multi-label `problem_type`. Token-level heads keep the model's loss over
        `num_items_in_batch` (Trainer's count of the window's labelled positions).
        """
        if self.task_loss_is_custom or self.kind.token_level or "labelled" not in counts:
            return None
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
            return None
        config = getattr(unwrap_peft(self.unwrap(model)), "config", None)
        if getattr(config, "problem_type", None) in ("regression", "multi_label_classification"):
            return None
        logits = logits_of(outputs)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            return None
        if logits.shape[1] < 2 or labels.dtype == torch.bool:  # one output: a regression head
            return None
        labelled = labels.ne(-100)
        if self.mix is not None:  # lam CE(y) + (1 - lam) CE(y[perm]): the permutation keeps the labelled count
            return self._mixed_rows(logits, labels).sum() * (scale / counts["labelled"])
        per_row = F.cross_entropy(
            logits,
            torch.where(labelled, labels, torch.zeros_like(labels)),
            reduction="none",
            label_smoothing=self.settings.label_smoothing,
        )
        return masked_sum(per_row, labelled) * (scale / counts["labelled"])

    def _mixed_rows(self, logits, labels) -> torch.Tensor:
        partner, lam = self.mix
        return mixed_cross_entropy(logits, labels, partner, lam, self.settings.label_smoothing)

    def predictions(self, model, outputs):
        """The student's outputs as evaluation gathers them: every tensor output is taken for a prediction, so the
        features requested only for the loss are left out."""
        if not self.student_flags(model):
            return outputs
        return type(outputs)(**{k: v for k, v in outputs.items() if k not in _OUTPUT_FEATURE_KEYS})

    def _weighted_sum(self, logged: dict, fused, head_term: str | None):
        """Σ weight × value over the task and the terms; `fused` holds the head term and task loss already."""
        weights = {"task": self.settings.task_weight, **{f"distill/{n}": w for n, w in self.term_set.weights.items()}}
        skipped = ("task", f"distill/{head_term}") if fused is not None else ()
        loss = fused
        for name, value in logged.items():
            if name in skipped or name not in weights:
                continue  # inside `fused` already, or one teacher's (or a peer's) share, logged only
            weighted = value if weights[name] == 1 else weights[name] * value
            loss = weighted if loss is None else loss + weighted
        return loss

    def _head_loss(self, s_hidden, teacher, labels, mask, counts, scale, num_items_in_batch, training):
        """The head term and, if weighted, the student's own next-token loss, by chunks (hfkd.probe.HeadPlan).

        Returns the weighted sum (with gradients) and each one's value for the logs. Both are normalised exactly as
        on the full-logits path: the term over the window's counted positions, the task loss as Trainer and the
        model's loss function do it (sum over `num_items_in_batch`, else a mean per batch divided by the
        accumulation steps).
        """
        plan, settings = self.plan.head, self.settings
        term = self.term_set.terms[plan.term]
        task_coef = None
        if settings.task_weight > 0 and isinstance(labels, torch.Tensor):  # evaluation may come without labels
            if settings.accepts_loss_kwargs and num_items_in_batch is not None:
                task_coef = 1.0 / num_items_in_batch * settings.process_scale
            else:
                task_coef = 1.0 / labels[:, 1:].ne(-100).sum().clamp_min(1)  # a tensor: no host sync
                if training:
                    task_coef = task_coef / self.accumulation_steps()
        per_unit = scale / counts["logit"]
        with self.source.whole_head():  # a sharded teacher's head is gathered for the chunks (hfkd.sharding)
            fused, term_sum, task_sum = term.head_loss(
                s_hidden,
                plan.student_head,
                teacher,
                plan.teacher_head,
                mask,
                self.term_set.weights[plan.term] * per_unit,
                labels=labels,
                task_scale=settings.task_weight * task_coef if task_coef is not None else None,
            )
        logged = {"task": task_sum * task_coef} if task_coef is not None else {}
        logged[f"distill/{plan.term}"] = term_sum * per_unit
        return fused, logged
