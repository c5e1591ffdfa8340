"""The recipe's stages, each a plain transformers or hfkd trainer over the run's state: teacher fine-tuning (stage 1),
the student, distillation, born-again generations and the labels-only comparison. Each stage reads the fields of
`RunState` that the stages before it set, and sets its own."""

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import sys

import numpy as np
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from ..augment import (
    MIX_LABELS,
    MIX_LAMBDA,
    Augmenter,
    RawRows,
    TextCollator,
    generator,
    mixed_cross_entropy,
    raw_rows,
)
from ..checkpoints import describe_skipped, last_complete_checkpoint
from ..config import DistillationConfig
from ..early_exit import EXITS_FILE
from ..metrics import load_metric
from ..run_folder import TEACHER_RECORD
from ..search import labelled_validation_split
from ..terms.base import logits_of
from ..trainer import DistillationTrainer
from .arguments import stage_args
from .data import collator, data_note
from .evaluation import evaluate, evaluate_all, text_fields
from .models import load_saved_teacher, make_student, read_teacher_record, teacher_lineage
from .state import Distillation, RunState

logger = logging.getLogger(__name__)


def planned_steps(args: TrainingArguments, num_rows: int) -> int:
    """The optimizer steps Trainer will take (its own formula), for the stage headings."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(num_rows / (args.per_device_train_batch_size * max(args.world_size, 1)))
    per_epoch = max(
        batches // args.gradient_accumulation_steps + int(batches % args.gradient_accumulation_steps > 0), 1
    )
    return math.ceil(args.num_train_epochs * per_epoch)


def heading(config: DistillationConfig, text: str) -> None:
    """A stage's heading on stderr, from the main process only."""
    if config.process_index == 0:
        print(f"\n== hfkd: {text}", file=sys.stderr, flush=True)


def reuse_finished_teacher(state: RunState) -> bool:
    """On resume, a teacher this run already fine-tuned and saved whole is loaded instead of trained again."""
    folder = os.path.join(state.out, "teacher")
    record = read_teacher_record(folder)
    if not state.resume or record is None:
        return False
    state.teacher = load_saved_teacher(state.recipe, state.source, folder, state.teacher, state.data)
    state.teacher_finetune = record["finetune"]
    return True


def finetune_teacher(state: RunState) -> None:
    """Stage 1: the teacher fine-tuned on the task (through LoRA when teacher_lora_r > 0, merged after), saved in
    teacher/ with its record; sets `teacher` and `teacher_finetune`."""
    r, data = state.recipe, state.data
    teacher = _with_lora(r, state.teacher) if r.teacher_lora_r else state.teacher
    args = stage_args(
        state.config,
        os.path.join(state.out, "teacher", "_trainer"),
        num_train_epochs=r.teacher_num_train_epochs,
        max_steps=r.teacher_max_steps,
        learning_rate=r.teacher_learning_rate,
    )
    steps = planned_steps(args, len(data.train_ds))
    heading(
        state.config,
        f"stage 1/2: teacher fine-tuning, {steps} steps (teacher_max_steps / teacher_num_train_epochs; "
        "--max_steps bounds distillation only)",
    )
    trainer = Trainer(
        model=teacher,
        args=args,
        train_dataset=data.train_ds,
        data_collator=collator(data, r.task, state.data_args, "teacher"),
        processing_class=data.processor,
    )
    trainer.train()
    if r.teacher_lora_r:
        teacher = teacher.merge_and_unload()
    state.teacher_finetune = {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "learning_rate": r.teacher_learning_rate,
        "batch_size": args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1),
        "train_examples": len(data.train_ds),
        "transfer_rows": data.transfer_rows,  # distillation's rows without a label, which the teacher did not see
        "lora_r": r.teacher_lora_r,
    }
    if state.config.process_index == 0:  # one writer under `accelerate launch`
        shutil.rmtree(args.output_dir, ignore_errors=True)
        _save_teacher(state, teacher)
    state.teacher = teacher


def _with_lora(recipe, teacher):
    """The teacher wrapped for LoRA fine-tuning through peft."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.CAUSAL_LM if recipe.task == "causal-lm" else TaskType.SEQ_CLS
    targets = recipe.teacher_lora_target_modules.split(",") if recipe.teacher_lora_target_modules else None
    lora = LoraConfig(
        task_type=task_type, r=recipe.teacher_lora_r, lora_alpha=recipe.teacher_lora_alpha, target_modules=targets
    )
    if recipe.task == "image-classification":
        lora.task_type = None
        lora.modules_to_save = ["classifier"]
    return get_peft_model(teacher, lora)


def _save_teacher(state: RunState, teacher) -> None:
    folder = os.path.join(state.out, "teacher")
    teacher.save_pretrained(folder)
    state.data.processor.save_pretrained(folder)
    # Written last: its presence says the folder holds a whole fine-tuned teacher (resume skips the stage),
    # and it carries the lineage to any later run that distils from this folder.
    record = {
        "base": teacher_lineage(state.recipe, state.config, state.source),
        "finetune": state.teacher_finetune,
        "data": data_note(state.data, state.recipe, state.data_args, state.config),
    }
    with open(os.path.join(folder, TEACHER_RECORD), "w") as handle:
        json.dump(record, handle, indent=1)


def build_student(state: RunState) -> None:
    """The student the recipe describes (built from the teacher's layers, or loaded); sets `student`, `student_note`."""
    state.student, state.student_note = make_student(state.recipe, state.config, state.data, state.teacher)


def _accuracy(prediction) -> dict:
    """The recipe's classification metric during training, the same `evaluate` accuracy as the final evaluation."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    result = load_metric("accuracy").compute(
        predictions=np.argmax(logits, -1).tolist(), references=prediction.label_ids.tolist()
    )
    return {"accuracy": result["accuracy"]}


class _RecipeTrainer(DistillationTrainer):
    """The recipe's distillation trainer: a causal LM's evaluation also reports the student's perplexity."""

    report_perplexity = False

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        task = output.metrics.get(f"{prefix}_task")
        if self.report_perplexity and task is not None:
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(task, 50.0))
        return output


# The search's record in checkpoints/ (kept locally, never pushed): a resumed run reads it instead of searching again.
SEARCH_RECORD = "search.json"


def distill_config(state: RunState) -> DistillationConfig:
    """The run's configuration with the search's chosen values (the configuration as given without a search)."""
    if state.search is None:
        return state.config
    return dataclasses.replace(state.config, **state.search["chosen"])


def search_split(train, transfer_rows: int, fraction: float, seed: int):
    """The search's (fit, validation) rows: a seeded `fraction` of the training rows scores the trials; with transfer
    rows (the last `transfer_rows` rows, labels -100) it is carved from the labelled rows alone
    (hfkd.search.labelled_validation_split) and every transfer row stays in the trials' training."""
    if not transfer_rows:
        parts = train.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]
    return labelled_validation_split(train, range(len(train) - transfer_rows), fraction, seed)


def search(state: RunState) -> None:
    """The temperature and weights searched (search_trials > 0, hfkd.search.kd_space): each trial distils a new
    student on the training rows less a validation part carved from them with the seed, and is scored on that part,
    never on the held-out split; sets `search`, whose chosen values the distillation runs with."""
    c, r, data = state.config, state.recipe, state.data
    record = os.path.join(state.out, "checkpoints", SEARCH_RECORD)
    if state.resume and os.path.isfile(record):
        with open(record) as handle:
            state.search = json.load(handle)
        heading(c, "search: already done in this run (checkpoints/search.json): its chosen values are used")
        return
    import optuna

    from ..search import kd_space

    fit, validation = search_split(data.distill_train_ds, data.transfer_rows, r.search_validation_fraction, c.seed)
    lm = r.task == "causal-lm"
    args = dataclasses.replace(
        c,
        **_side_run(state, "_search"),
        overwrite_output_dir=True,
        teacher_model_name_or_path=None,
        teacher_model_init_kwargs=None,
        teacher_cache_dir=None,  # the cache holds the outputs of all training rows: the trials run the teacher
        peer_model_name_or_path=None,
        teacher_processing_class=None,
        eval_with_teacher=False,  # the student alone: its loss does not depend on the trial's weights
        **({"max_steps": r.search_max_steps} if r.search_max_steps > 0 else {}),
    )
    steps = planned_steps(args, len(fit))
    heading(
        c,
        f"search: {r.search_trials} trials of {steps} steps on {len(fit)} training rows, each scored on "
        f"{len(validation)} validation rows carved from the training data (seed {c.seed})",
    )
    trainer = _RecipeTrainer(
        model_init=lambda: make_student(r, c, data, state.teacher)[0],
        teacher_model=state.teacher,
        args=args,
        train_dataset=fit,
        eval_dataset=validation,
        data_collator=collator(data, r.task, state.data_args, "distill"),
        processing_class=data.student_processor,
        teacher_processing_class=data.processor if data.across else None,
        compute_metrics=None if lm else _accuracy,
    )
    objective, direction = ("eval_task", "minimize") if lm else ("eval_accuracy", "maximize")
    best = trainer.hyperparameter_search(
        hp_space=kd_space(c),
        compute_objective=lambda metrics: metrics[objective],
        n_trials=r.search_trials,
        direction=direction,
        backend="optuna",
        sampler=optuna.samplers.TPESampler(seed=c.seed),
    )
    shutil.rmtree(args.output_dir, ignore_errors=True)
    state.search = {
        "trials": trainer.search_history,
        "chosen": best.hyperparameters,
        "best_trial": int(best.run_id),
        "objective": "the student's own loss on the validation rows" if lm else "validation accuracy",
        "direction": direction,
        "train_rows": len(fit),
        "validation_rows": len(validation),
        "validation_fraction": r.search_validation_fraction,
        "steps_per_trial": trainer.state.global_step,
        "seed": c.seed,
    }
    if c.process_index == 0:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        with open(record, "w") as handle:
            json.dump(state.search, handle, indent=1)


def distill(state: RunState) -> None:
    """The student learns from the teacher (or, with peers, from them) with hfkd's trainer; checkpoints go to
    checkpoints/, from which a resumed run continues. Sets `distillation`."""
    c, r, data = distill_config(state), state.recipe, state.data
    args = dataclasses.replace(
        c,
        output_dir=os.path.join(state.out, "checkpoints"),
        overwrite_output_dir=c.overwrite_output_dir,
        resume_from_checkpoint=None,  # given to train() below, after the run's own checks
        push_to_hub=False,  # the recipe pushes the finished folder itself
        teacher_model_name_or_path=None,
        teacher_model_init_kwargs=None,
        peer_model_name_or_path=None,  # the trainer gets the peers this run loaded
        teacher_processing_class=None,  # given below as a tokenizer when the student has its own
        # The data's text columns, which word augmentations (augment) read from the rows.
        tokenize_text_column=state.data_args.text_column,
        tokenize_text_pair_column=state.data_args.text_pair_column,
        report_to=c.report_to,
    )
    callbacks = []
    if r.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(r.early_stopping_patience, r.early_stopping_threshold))
    lm = r.task == "causal-lm"
    trainer = _RecipeTrainer(
        model=state.student,
        # With peers, or terms that all read the student alone (byot), the teacher does not teach: it is compared.
        teacher_model=None if state.peers or not c.reads_teacher else state.teacher,
        peer_models=state.peers or None,
        args=args,
        train_dataset=data.distill_train_ds,
        eval_dataset=data.distill_eval_ds,
        data_collator=collator(data, r.task, state.data_args, "distill"),
        processing_class=data.student_processor,
        teacher_processing_class=data.processor if data.across else None,
        compute_metrics=None if lm else _accuracy,
        callbacks=callbacks,
    )
    trainer.report_perplexity = lm
    resume, from_step = _resume_point(state.resume, args.output_dir)
    heading(c, _distill_heading(state, c, planned_steps(args, len(data.distill_train_ds)), from_step))
    trainer.train(resume_from_checkpoint=resume)
    _save_beside_student(state, trainer)
    state.distillation = Distillation(
        state=trainer.state,
        args=trainer.args,
        log_history=trainer.state.log_history,
        # The terms that pair layers per stream (hidden, attention) say how they paired them.
        layer_maps={
            name: dict(term.pairs)
            for name, term in trainer.term_set.terms.items()
            if isinstance(getattr(term, "pairs", None), dict) and term.pairs
        },
    )


def _save_beside_student(state: RunState, trainer) -> None:
    """The files the terms offer the student (byot's exit heads), in the run's folder beside it; sets `early_exit`."""
    if trainer.args.should_save:
        state.early_exit = EXITS_FILE in trainer.term_set.save_beside_student(state.out)


def _resume_point(resume, checkpoints: str) -> tuple[bool | str | None, str]:
    """The checkpoint distillation resumes from, and what its heading says of it."""
    skipped_note = ""
    if resume is True:
        # The newest complete checkpoint: one the run was killed while saving is passed over, and said so.
        resume, skipped = last_complete_checkpoint(checkpoints)
        if skipped:
            skipped_note = f" (skipped {describe_skipped(skipped)}: the run stopped while saving it)"
            logger.warning(
                "resume_from_checkpoint=true: skipped %s, cut short while saving; %s.",
                describe_skipped(skipped),
                f"resuming from {resume}, the newest complete checkpoint"
                if resume
                else "no distillation checkpoint is complete, so distillation starts again",
            )
        # None: the run stopped before its first complete distillation checkpoint; distillation starts again.
    from_step = f", resuming from {resume}{skipped_note}" if isinstance(resume, str) else skipped_note
    return resume, from_step


def _distill_heading(state: RunState, config: DistillationConfig, steps: int, from_step: str) -> str:
    stage = f"stage {2 if state.recipe.finetune_teacher else 1}/{2 if state.recipe.finetune_teacher else 1}"
    # `config`, not a new distill_config(state): building TrainingArguments resets Accelerate's state, which the
    # trainer made just before holds.
    if not state.peers and not config.reads_teacher:
        return (
            f"{stage}: self-distillation (every term reads the student alone), {steps} steps{from_step}; the teacher "
            "does not teach (it is evaluated for comparison)"
        )
    if state.peers:
        return (
            f"{stage}: deep mutual learning, the student and {len(state.peers)} peer(s) ({', '.join(state.peers)}) "
            f"learn from the labels and from each other, {steps} steps{from_step}; the teacher does not teach "
            "(it is evaluated for comparison)"
        )
    tokenized = ", text tokenized for both tokenizers" if state.data.across else ""
    if state.data.cross_modal:
        tokenized = f", the teacher reading each row's text and the student its {state.recipe.student_modality}"
    return f"{stage}: distillation, {steps} steps{from_step}{tokenized}"


def _side_run(state: RunState, name: str) -> dict:
    """Training arguments of a run beside the distillation (comparison, generations): no checkpoints, no
    evaluation during training, no logging integrations, nothing pushed, a scratch folder under checkpoints/."""
    return dict(
        output_dir=os.path.join(state.out, "checkpoints", name),
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        metric_for_best_model=None,
        report_to=[],
        push_to_hub=False,
        resume_from_checkpoint=None,
    )


def _train_beside(state: RunState, trainer_cls, student, args, train_dataset=None, **kwargs):
    """Trains `student` on the recipe's data (default: distillation's rows as the student reads them) in a run
    beside the distillation; its scratch folder goes after."""
    kwargs.setdefault("data_collator", collator(state.data, state.recipe.task, state.data_args, "student"))
    trainer = trainer_cls(
        model=student,
        args=args,
        train_dataset=state.data.student_train_ds if train_dataset is None else train_dataset,
        processing_class=state.data.student_processor,
        **kwargs,
    )
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return trainer


def born_again(state: RunState) -> None:
    """Generations 2..N (Furlanello et al. 2018): each a student from the same initial weights, taught by the
    generation before it, with the same terms and budget; the last one becomes the run's student. Sets
    `generations` and `student`."""
    c, r = distill_config(state), state.recipe
    state.generations = [
        {
            "generation": 1,
            "teacher": "the teacher",
            "steps": state.distillation.state.global_step,
            "metric": evaluate(state, state.student),
        }
    ]
    for generation in range(2, r.generations + 1):
        teacher = state.student
        student, _ = make_student(r, c, state.data, state.teacher)
        args = dataclasses.replace(
            c,
            **_side_run(state, f"_generation-{generation}"),
            overwrite_output_dir=True,
            teacher_model_name_or_path=None,
            teacher_model_init_kwargs=None,
            teacher_cache_dir=None,  # the cache holds the first teacher's outputs, not this generation's
        )
        heading(
            c,
            f"born-again generation {generation}/{r.generations}: the same student, taught by "
            f"generation {generation - 1}, {planned_steps(args, len(state.data.student_train_ds))} steps",
        )
        trainer = _train_beside(state, DistillationTrainer, student, args, teacher_model=teacher)
        _save_beside_student(state, trainer)  # the exit heads of this generation's student
        state.student = student
        state.generations.append(
            {
                "generation": generation,
                "teacher": f"generation {generation - 1}",
                "steps": trainer.state.global_step,
                "metric": evaluate(state, student),
            }
        )


class _AugmentedTrainer(Trainer):
    """transformers.Trainer whose training micro-batches take distillation's augmentation (hfkd.augment), drawn as
    DistillationTrainer draws them, from (seed, global step, micro-batch, process): the labels-only comparison sees
    the views the distilled student sees. Mixup and cutmix mix the labels too: lam CE(y) + (1 - lam) CE(y[perm])
    per row, in the units of the model's own loss (which it equals at lam = 1)."""

    def __init__(self, *args, augmenter: Augmenter, **kwargs):
        super().__init__(*args, **kwargs)
        self.augmenter = augmenter

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.augmenter.text:  # the collator tokenizes each augmented batch from the rows' text
            text = [c for c in (self.augmenter.text_column, self.augmenter.text_pair_column) if c]
            self._signature_columns += [c for c in text if c not in self._signature_columns]

    def get_train_dataloader(self):
        if not self.augmenter.text:
            return super().get_train_dataloader()
        collator, self.data_collator = self.data_collator, raw_rows  # rows stay text until augmented
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        views = []
        for index, batch in enumerate(itertools.islice(epoch_iterator, num_batches)):
            rng = generator(self.args.seed, self.state.global_step, index, self.args.process_index)
            if isinstance(batch, RawRows):
                views.append(self._prepare_inputs(self.augmenter.view(batch, rng, self.data_collator)))
            else:
                views.append(self.augmenter.view(batch, rng))
        return super().get_batch_samples(iter(views), len(views), device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        partner, lam = inputs.pop(MIX_LABELS, None), inputs.pop(MIX_LAMBDA, None)
        if partner is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        smoothing = self.args.label_smoothing_factor
        per_row = mixed_cross_entropy(logits_of(outputs), labels, partner, lam, smoothing)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # As the model's own loss with num_items_in_batch: a sum over the window's labelled rows.
            loss = per_row.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        else:  # the model's mean over this micro-batch's labelled rows (Trainer divides by accumulation)
            loss = per_row.sum() / labels.ne(-100).sum().clamp_min(1)
        return (loss, outputs) if return_outputs else loss


def _labels_only_trainer(state: RunState, rows):
    """The labels-only comparison's trainer class, keyword arguments and rows: plain transformers.Trainer, or with
    `augment` the same augmentation as distillation (`_AugmentedTrainer`), text rows keeping their text."""
    c, data = distill_config(state), state.data
    augmenter = Augmenter.from_config(
        dataclasses.replace(
            c,
            tokenize_text_column=state.data_args.text_column,
            tokenize_text_pair_column=state.data_args.text_pair_column,
        ),
        getattr(data.student_processor, "tokenizer", data.student_processor),
    )
    if augmenter is None:
        return Trainer, {}, rows
    kwargs = {"augmenter": augmenter}
    if augmenter.text:
        # Distillation's rows keep their text (labelled rows first); the student's tokenizer reads the augmented one.
        rows = data.distill_train_ds.select(range(len(rows)))
        args = state.data_args
        kwargs["data_collator"] = TextCollator(
            data.student_processor, args.text_column, args.text_pair_column, args.max_length
        )
    return _AugmentedTrainer, kwargs, rows


def train_labels_only(state: RunState) -> None:
    """The same student, data and budget on the labels alone, with plain transformers.Trainer. Sets `labels_only`
    and `labels_only_rows`.

    With transfer rows it trains on the labelled rows only, for as many optimizer steps as distillation planned
    (the same budget: max_steps, its data looping over the labelled rows); the schedule, batches and every other
    setting stay the distillation's. With `augment`, its batches are augmented as distillation's are, with the same
    draws (`_AugmentedTrainer`), so that the comparison is between the teacher's help and none, not augmentation."""
    c, data = state.config, state.data
    student, _ = make_student(state.recipe, c, data, state.teacher)
    kwargs = {f.name: getattr(c, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    kwargs.update(**_side_run(state, "_labels_only"), greater_is_better=None)
    rows, over = data.labelled_rows, ""
    if data.transfer_rows:
        kwargs["max_steps"] = state.distillation.state.max_steps
        over = (
            f" over the {len(rows)} labelled rows (distillation's budget; its {data.transfer_rows} transfer rows "
            "have no label)"
        )
    args = TrainingArguments(**kwargs)
    heading(c, f"comparison: the same student on the labels alone, {planned_steps(args, len(rows))} steps{over}")
    trainer_cls, extra, rows = _labels_only_trainer(state, rows)
    trainer = _train_beside(state, trainer_cls, student, args, train_dataset=rows, **extra)
    metric, text, state.labels_only_rows = evaluate_all(state, student)
    state.labels_only = {
        "steps": trainer.state.global_step,
        "train_examples": len(rows),
        "metric": metric,
        **text_fields(text),
    }
