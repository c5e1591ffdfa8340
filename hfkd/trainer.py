"""`DistillationTrainer`: the adapter to `transformers.Trainer`. The hooks it overrides delegate to the teacher
source (hfkd.sources), the mixer (hfkd.mixing), the step (hfkd.step, planned by hfkd.probe, normalised by hfkd.units)
and the run's checkpoint records (hfkd.checkpoints)."""

import contextlib
import dataclasses
import itertools
import logging
import os

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    BestRun,
    enable_full_determinism,
    number_of_arguments,
    set_seed,
)

from . import checks
from .alignment import match_vocabularies
from .augment import IMAGE_OPS, TEXT_OPS, Augmenter, RawRows, TextCollator, generator, raw_rows
from .batch import ROW_COLUMN, SPANS, TEACHER_ID, TEACHER_PREFIX, TEACHER_SPANS, teacher_key
from .checkpoints import RUN_FILE, check_run_folder, last_complete_checkpoint, resume_target, write_run_file
from .config import DistillationConfig
from .cross_modal import cross_modal_collator, setup_cross_modal
from .errors import NonFiniteLossError
from .fingerprint import model_fingerprint
from .launch import check_launch
from .mixing import TeacherMixer, check_teacher_ids, fixed_weights
from .models import ensure_eager_attention, unwrap_peft, warn_attention_dropout
from .on_policy import build_generation
from .probe import probe, term_features
from .saved_weights import complete_load
from .sharding import (
    PEERS_OPTIMIZER_FILE,
    TERMS_OPTIMIZER_FILE,
    DetachedGroups,
    check_teacher_memory,
    check_wrap_classes,
    clip_joint_norm,
    enable_fsdp_on_cpu,
    keep_root_gathered_until_backward,
    replicated,
)
from .sources import build_source
from .step import DistillationStep, TaskLossSettings
from .streams import model_kind
from .terms.runner import TermSet, with_row_ids
from .transfer import MissingLabelCollator, missing_label_columns
from .two_tokenizers import TwoTokenizerCollator, check_terms_across_tokenizers, setup_teacher_tokenizer
from .units import LoggedSums, WindowUnits

logger = logging.getLogger(__name__)

__all__ = ["RUN_FILE", "DistillationTrainer", "NonFiniteLossError"]


class DistillationTrainer(Trainer):
    """A `Trainer` whose student also learns from frozen teachers.

    It takes everything `Trainer` takes, plus `teacher_model`: a model, a Hub id or a local path, or a list or dict of
    them for several teachers (hfkd.mixing); or set `DistillationConfig.teacher_model_name_or_path`, a teacher cache
    (`teacher_cache_dir`), or `teacher_ema_decay` for a mean teacher made from the student (hfkd.ema). The loss is the
    weighted sum of the student's own loss and the distillation terms configured in [`DistillationConfig`] (`terms`,
    and the short-form fields of the built-in ones); each is logged on its own: `task` for the student's own loss,
    `distill/<name>` for each term (and `distill/<name>/<teacher>` for each of several teachers).

    Example:
        ```python
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=DistillationConfig(output_dir="out"), train_dataset=ds
        )
        trainer.train()
        ```
    """

    def __init__(
        self,
        model=None,
        args=None,
        *trainer_args,
        teacher_model=None,
        peer_models=None,
        teacher_processing_class=None,
        **trainer_kwargs,
    ):
        if args is None:
            args = DistillationConfig(output_dir="trainer_output")
        elif not isinstance(args, DistillationConfig):
            if not isinstance(args, TrainingArguments):
                raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}.")
            logger.warning("args is a plain TrainingArguments; using DistillationConfig defaults for distillation.")
            args = DistillationConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})

        model, model_init = _student_from_model_init(model, args, trainer_args, trainer_kwargs)
        if model_init is not None and (
            args.teacher_ema_decay is not None or peer_models or args.peer_model_name_or_path
        ):
            raise ValueError(
                "model_init builds a new student for each train() and search trial, but a mean teacher "
                "(teacher_ema_decay) or peers are made for one student; pass model= instead of model_init."
            )
        # Checked before Trainer creates output_dir.
        source = build_source(model, args, teacher_model, peer_models)
        names = list(source.names)
        weights = fixed_weights(args.teacher_weights, names) if len(names) > 1 else None
        # A teacher of another modality reads its own columns through the collator's processors (hfkd.cross_modal).
        setup_cross_modal(model, args, source, teacher_processing_class, trainer_args, trainer_kwargs)
        teacher_tokenizer = setup_teacher_tokenizer(
            model, args, teacher_processing_class, source, trainer_args, trainer_kwargs
        )
        _text_collator_for_augmentation(args, teacher_tokenizer, trainer_args, trainer_kwargs)

        # Trainer creates output_dir; every check below runs before the first step, and a failing one removes it.
        with checks.removing_new_output_dir(args.output_dir if args.should_save else None):
            super().__init__(model, args, *trainer_args, **trainer_kwargs)
            if model_init is not None and (self.optimizer is not None or self.lr_scheduler is not None):
                raise ValueError(
                    "model_init builds a new student for each train(), which an optimizer given by `optimizers=` does "
                    "not know; use `optimizer_cls_and_kwargs=` instead."
                )
            self.model_init = model_init  # Trainer.train calls it: a new student for each run and trial
            self.search_history: list[dict] = []
            self.teacher_processing_class = teacher_tokenizer
            self._setup_distillation(args, source, TeacherMixer(args.teacher_combine, weights))

    # ------------------------------------------------------------------ public attributes
    @property
    def teachers(self) -> dict[str, torch.nn.Module]:
        """Each teacher model by name (one teacher: "teacher"); {} when none runs (a cache alone, peers)."""
        return self.source.models()

    @property
    def teacher_model(self) -> torch.nn.Module | None:
        """The first teacher model, for code that knows one."""
        return next(iter(self.teachers.values()), None)

    @property
    def peers(self) -> dict[str, torch.nn.Module]:
        """The peers of deep mutual learning by name (hfkd.peers); {} without any."""
        return self.source.learners()

    # ------------------------------------------------------------------ set-up
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)  # FSDP asked for on CPU: Accelerate's FSDP2 path over gloo (hfkd.sharding)

    def _setup_distillation(self, args: DistillationConfig, source, mixer: TeacherMixer) -> None:
        check_launch(
            args,
            processes=self.accelerator.num_processes,
            distributed_type=self.accelerator.distributed_type,
            fsdp_applied=self.is_fsdp_enabled,
        )
        if self.is_fsdp_enabled:
            check_wrap_classes(self.accelerator.state.fsdp_plugin, unwrap_peft(self.model))
        # compute_loss normalises every term over the whole accumulated batch itself (see get_batch_samples).
        self.loss_is_scaled_for_ga = True
        if not self.label_names and self.compute_loss_func is not None and args.label_names is None:
            # A plain nn.Module student has no `labels` in its forward, so Trainer would drop them from the batch;
            # its compute_loss_func (the task loss) and label-reading terms need them.
            self.label_names = ["labels"]
        self.source = source
        self.term_set = self._build_terms(args, source)
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        check_teacher_memory(
            args.teacher_memory_limit, source.models(), self.accelerator.num_processes, self.is_fsdp_enabled or zero3
        )
        source.attach(self)
        kind = model_kind(unwrap_peft(self.model), self._loss_shifts_labels)
        if kind.token_level and cross_modal_collator(self.data_collator) is not None:
            raise ValueError(
                "The teacher and the student read different modalities (CrossModalCollator), which share no "
                f"positions, but the student ({type(unwrap_peft(self.model)).__name__}) predicts per position; "
                "cross-modal distillation needs classifiers with one prediction per example (e.g. *ForSequence"
                "Classification, *ForAudioClassification, *ForImageClassification) over the same labels."
            )
        mixer.shifts_labels = kind.shifts_labels
        self.step = DistillationStep(
            self.term_set,
            source,
            mixer.to(args.device),
            WindowUnits(kind, args.world_size, self.accelerator.gather),
            self._task_loss,
            TaskLossSettings(
                task_weight=args.task_weight,
                accepts_loss_kwargs=self.model_accepts_loss_kwargs,
                process_scale=self.accelerator.num_processes // self.get_tp_size()
                if args.average_tokens_across_devices
                else 1,
                label_smoothing=args.label_smoothing_factor if self.label_smoother is not None else 0.0,
            ),
            accumulation_steps=lambda: getattr(self, "current_gradient_accumulation_steps", 1),
            unwrap=self.accelerator.unwrap_model,
            prediction_loss_only=args.prediction_loss_only,
        )
        self.step.task_loss_is_custom = self.compute_loss_func is not None
        if self.teacher_processing_class is not None and hasattr(self.processing_class, "get_vocab"):
            self.step.matched_vocab = match_vocabularies(
                self.processing_class.get_vocab(), self.teacher_processing_class.get_vocab()
            )
        # What the wrappers below start from: a new student (model_init) is set up again from the data as given.
        self._given_data = (self.train_dataset, self.data_collator)
        if args.teacher_combine == "teacher_id":
            check_teacher_ids(
                {"train_dataset": self.train_dataset, "eval_dataset": self.eval_dataset}, list(source.names)
            )
        self._logged = {mode: LoggedSums(args.world_size, self.accelerator.reduce) for mode in ("train", "eval")}
        self._train_windows = 0  # optimizer steps (accumulation windows) since the last training log
        self._predicting = False
        self._check_data()
        self.augmenter = Augmenter.from_config(
            args, getattr(self.processing_class, "tokenizer", self.processing_class)
        )
        if self.augmenter is not None:
            self._check_augment(kind)
        missing = missing_label_columns({"train_dataset": self.train_dataset, "eval_dataset": self.eval_dataset})
        if missing:  # rows without a label (None): -100 before the collator stacks them (hfkd.transfer)
            self.data_collator = MissingLabelCollator(self.data_collator, missing)
        student = unwrap_peft(self.accelerator.unwrap_model(self.model))
        self._generation = build_generation(
            args,
            student=student,
            teachers={n: unwrap_peft(self.accelerator.unwrap_model(t)) for n, t in self.teachers.items()},
            learners=self.peers,
            sharded=self.is_deepspeed_enabled or self.is_fsdp_enabled,
            kind=kind,
            processing_class=self.processing_class,
            dataset=self.train_dataset,
            collator=self.data_collator,
            first_batch=self._probe_batch,
        )
        # The source first: a teacher cache checks the data as the user gave it (before any index column is added),
        # then routes each row's cached outputs by that row's index.
        source.prepare_data(self)
        if self.term_set.needs().row_ids:  # terms with per-row memory (CRD): batches carry each row's index
            self.train_dataset, self.data_collator = with_row_ids(
                self.train_dataset, self.data_collator, self.term_set
            )
            self.step.num_rows = len(self.train_dataset)
        # Taken before any forward pass: heads fill config fields such as `problem_type` on first use.
        self._fingerprint = {
            **source.fingerprint(self.term_set.multi),
            "student": model_fingerprint(self.accelerator.unwrap_model(self.model), with_name=False),
        }
        if self.step.distills:
            self._probe()

    def _build_terms(self, args: DistillationConfig, source) -> TermSet:
        """The configured terms, bound to the models' submodule names and checked against the source."""
        term_set = TermSet(args.term_specs, source.names or ("teacher",))
        # Before any needs(): terms that pick their submodules by name patterns resolve them from these names
        # (the same unwrapped models the hooks capture).
        student = unwrap_peft(self.accelerator.unwrap_model(self.model))
        term_set.bind_module_names(tuple(name for name, _ in student.named_modules()), source.module_names())
        if self.teacher_processing_class is not None:
            check_terms_across_tokenizers(dict(term_set.terms))
        if term_set.needs().attentions:
            ensure_eager_attention(self.model, "student")
            warn_attention_dropout(student)
        source.check_terms(term_set)
        return term_set

    def _limits(self) -> tuple[checks.ModelLimits, dict[str, checks.ModelLimits]]:
        """What the student and each teacher accept, read from their configs (see hfkd.checks)."""
        student = checks.model_limits(self.accelerator.unwrap_model(self.model), "student")
        if self.label_names:  # Trainer's label names (args.label_names or the model's own)
            student = dataclasses.replace(student, label_names=tuple(self.label_names))
        return student, self.source.limits()

    def _check_data(self) -> None:
        """Data-set checks before the first step, without a forward: rows, columns, labels, token ids, lengths."""
        student, teachers = self._limits()
        # A teacher with its own tokenizer has its own vocabulary: only a shared label space must match.
        own_vocabulary = self.teacher_processing_class is not None and student.label_kind == "vocabulary"
        by_class = any(
            term.needs().logits and term.reads_teacher and not type(term).across_vocabularies
            for term in self.term_set.terms.values()
        )
        for teacher in teachers.values():
            checks.check_logit_heads(student, teacher, by_class and not own_vocabulary)
            for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
                # Evaluation without labels is legitimate (no loss, predictions only); training without them is not.
                checks.check_dataset(
                    dataset,
                    name,
                    student,
                    teacher,
                    self.data_collator,
                    task_loss=self.args.task_weight > 0,
                    require_labels=name == "train_dataset",
                )

    def _check_augment(self, kind) -> None:
        """The configured augmentation fits the training data and the student (before the first step)."""
        named = f"augment={self.args.augment!r}"
        dataset = self.train_dataset
        columns = getattr(dataset, "column_names", None)
        if (
            not isinstance(columns, list)
            and dataset is not None
            and not isinstance(dataset, torch.utils.data.IterableDataset)
        ):
            first = dataset[0] if len(dataset) else None
            columns = list(first) if isinstance(first, dict) else None
        if self.augmenter.text:  # read from the rows: the collator may not even take them
            if columns is not None and "pixel_values" in columns:
                raise ValueError(
                    f"{named} changes words of text, but the training batches are images (`pixel_values`); use "
                    f"the image augmentations {list(IMAGE_OPS)}, or unset augment."
                )
            wanted = [c for c in (self.augmenter.text_column, self.augmenter.text_pair_column) if c]
            missing = [c for c in wanted if columns is not None and c not in columns]
            if missing:
                raise ValueError(
                    f"{named} changes words before tokenizing, so the training rows must keep their raw text, but "
                    f"train_dataset has no {missing[0]!r} column (its columns: {columns}). Keep the text column and "
                    "name it with tokenize_text_column (hfkd tokenizes each augmented batch on the fly), or unset "
                    "augment."
                )
            if _text_collator(self.data_collator) is None:
                raise ValueError(
                    f"{named} tokenizes each augmented batch, but data_collator "
                    f"({type(self.data_collator).__name__}) does not tokenize text rows. Pass no data_collator "
                    "(hfkd then tokenizes the text column with processing_class, or with both tokenizers when "
                    "teacher_processing_class is set), or unset augment."
                )
            return
        if dataset is None:
            return  # no training data: nothing is augmented
        batch = self._probe_batch()
        keys = sorted(k for k in batch if not k.startswith("hfkd_"))
        pixels = batch.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or not pixels.is_floating_point():
            raise ValueError(
                f"{named} works on images, but the training batches hold no `pixel_values` [batch, channels, height, "
                f"width] of floats (their keys: {keys}). For text use {list(TEXT_OPS)}, which change words before "
                "tokenizing; else unset augment."
            )
        own = [k for k in keys if k.startswith(TEACHER_PREFIX) and k != TEACHER_ID]
        if own:
            raise ValueError(
                f"{named}: the batches carry inputs of the teacher's own ({own}), "
                "which the student's augmented view would not change, so the two would see different images. Give "
                "both models the same `pixel_values`, or unset augment."
            )
        if self.augmenter.mixes:
            labels = batch.get("labels")
            config = getattr(unwrap_peft(self.accelerator.unwrap_model(self.model)), "config", None)
            example_level = (
                isinstance(labels, torch.Tensor)
                and labels.dim() == 1
                and not labels.is_floating_point()
                and not kind.token_level
                and self.compute_loss_func is None
                and getattr(config, "problem_type", None) not in ("regression", "multi_label_classification")
            )
            if not example_level:
                raise ValueError(
                    f"{named} mixes images and their labels (lam CE(y) + (1 - lam) CE(y[perm])), which needs a "
                    "single-label image classifier with one class id per image and no compute_loss_func. Use "
                    "'crop,flip' for this student, or unset augment."
                )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [teacher_key(c) for c in self._signature_columns if not c.startswith(TEACHER_PREFIX)]
        extra += [ROW_COLUMN, TEACHER_ID, SPANS, TEACHER_SPANS]
        collator = _text_collator(self.data_collator)
        if collator is not None:  # it tokenizes the text columns itself
            extra += sorted(collator.text_columns())
        cross = cross_modal_collator(self.data_collator)
        if cross is not None:  # its processors read each model's raw columns
            extra += sorted(cross.input_columns())
        self._signature_columns += [c for c in extra if c not in self._signature_columns]

    def _probe_batch(self) -> dict | None:
        """Two examples of the training (or evaluation) data, collated and on the device."""
        dataset = self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()), None)
        if dataset is None:
            return None
        collator = self.data_collator
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="probe")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="probe")
        except ImportError:
            pass
        if isinstance(dataset, torch.utils.data.IterableDataset):
            features = [example for example, _ in zip(dataset, range(2), strict=False)]
        else:
            features = [dataset[i] for i in range(min(2, len(dataset)))]
        if not features:
            which = "train_dataset" if self.train_dataset is not None else "eval_dataset"
            raise ValueError(f"{which} is empty (0 rows): there is nothing to distil on. Check the split and filters.")
        return self._prepare_inputs(collator(features))

    def _probe(self, batch: dict | None = None) -> None:
        """The probe (hfkd.probe) on two examples before training; a trainer built without data is probed on its
        first batch instead (`batch`): the checks and the chunked head path then still apply, but nothing trainable
        can be added to an optimizer that exists already."""
        first_batch = batch is not None
        batch = batch if batch is not None else self._probe_batch()
        if batch is None:
            return  # planned on the first batch compute_loss sees

        def setup_terms(student_out, s_modules, teaching, t_modules, window):
            self._setup_terms(student_out, s_modules, teaching, t_modules, window, first_batch)

        self.step.plan = probe(
            self.step,
            self.model,
            batch,
            self._limits(),
            require_labels=self.train_dataset is not None,  # the probe batch may come from eval_dataset
            # ZeRO-3's and FSDP1's sharded parameters exist only inside their module's forward (FSDP2's heads are
            # gathered for the chunks: hfkd.sharding); the label smoother and compute_loss_func need the full logits.
            chunk_allowed=not (self.is_deepspeed_enabled or (self.is_fsdp_enabled and not self.accelerator.is_fsdp2))
            and self.label_smoother is None
            and self.compute_loss_func is None,
            setup_terms=setup_terms,
        )

    def _setup_terms(self, student_out, s_modules, teaching, t_modules, batch, first_batch: bool) -> None:
        """The configured terms see real outputs once, check them and build their parameters, before the optimizer."""
        student, teachers = term_features(self.step, student_out, s_modules, teaching, t_modules)
        self.source.check_probe_outputs(self.term_set, student, teachers)
        mixed, _ = self.step.mixer.mix(self.term_set, teachers, batch)
        self.term_set.setup(student, teachers, self.step.term_batch(batch, training=False), mixed)
        if self.term_set.has_state() and self.optimizer is not None:
            stateful = [name for name, term in self.term_set.terms.items() if any(True for _ in term.state_dict())]
            if first_batch:
                raise ValueError(
                    f"The terms {stateful} build trainable state (e.g. projections where the widths differ) from the "
                    "first batch, but the optimizer exists already: pass train_dataset (or eval_dataset) to "
                    "DistillationTrainer so that they are built before it."
                )
            raise ValueError(
                f"The terms {stateful} train parameters of their own (e.g. projections where the student and teacher "
                "widths differ), but `optimizers=` gave an optimizer that does not know them. Let "
                "DistillationTrainer create the optimizer, or use `optimizer_cls_and_kwargs=` instead."
            )
        self.term_set.to(device=next(self.model.parameters()).device)
        if self.term_set.has_state() and self.is_fsdp_enabled:
            self.step.terms_module = replicated(self.term_set, self.accelerator)  # small: replicated, not sharded
        elif self.term_set.has_state():
            self.step.terms_module = self.accelerator.prepare_model(self.term_set)

    def _hp_search_setup(self, trial) -> None:
        super()._hp_search_setup(trial)
        if self.model_init is None:
            return
        # Trainer.train has just built a new student (model_init) and, in a search, set the trial's values on args
        # (and made a new accelerator): the terms, the step and the data wrappers are built again for them, with
        # the same teacher source, so the teachers load once and no term state (projections, memory banks) carries
        # over from the run before.
        self.args._refresh_terms()
        self.train_dataset, self.data_collator = self._given_data
        self._setup_distillation(self.args, self.source, self.step.mixer)

    def hyperparameter_search(
        self,
        hp_space=None,
        compute_objective=None,
        n_trials: int = 20,
        direction="minimize",
        backend=None,
        hp_name=None,
        **kwargs,
    ):
        """`Trainer.hyperparameter_search` for distillation: each trial trains a new student from `model_init` with
        the trial's temperature and weights, the same teachers (loaded once) and new term state, and is scored on
        `eval_dataset`, which must be rows held out from the training data, never the split you report on.

        Args:
            hp_space: `trial -> dict` of `DistillationConfig` fields; default `hfkd.search.kd_space(self.args)`
                (temperature, the logit share and each configured term's weight).
            compute_objective: metrics -> float; default the student's own loss on the validation rows
                (`hfkd.search.student_loss_objective`, to minimise). The weighted `eval_loss` depends on the trial's
                weights and temperature, so it cannot compare trials.
            n_trials, direction, backend, hp_name, kwargs: as `Trainer.hyperparameter_search` (Optuna: `pip install
                hfkd[search]`; kwargs go to `optuna.create_study`, e.g. `sampler=`).

        Returns:
            The best run (`transformers.trainer_utils.BestRun`); under Optuna its `hyperparameters` are the fields the
            best trial set (apply them with `setattr(trainer.args, name, value)` before `trainer.train()`).
            `self.search_history` lists every trial: its number, the fields it set and its objective. Afterwards
            `args` hold the values they had before the search.
        """
        from .search import kd_space, require_optuna, student_loss_objective

        if self.model_init is None:
            raise ValueError(
                "hyperparameter_search trains a new student in each trial: pass model_init= (a function returning a "
                "new student) to DistillationTrainer instead of model=."
            )
        if self.eval_dataset is None:
            raise ValueError(
                "hyperparameter_search selects each trial on eval_dataset, but this trainer has none: pass "
                "eval_dataset= rows held out from the training data (e.g. train_dataset.train_test_split), never "
                "the split the final figures come from."
            )
        if backend is None or str(getattr(backend, "value", backend)) == "optuna":
            require_optuna()
            backend = "optuna"
        names = ("temperature", "task_weight", "logit_weight", "hidden_weight", "attention_weight")
        # Trainer casts each trial's value to the type of the field's current value: an int weight would truncate.
        for name in names:
            setattr(self.args, name, float(getattr(self.args, name)))
        saved = {name: getattr(self.args, name) for name in (*names, "terms")}
        space = kd_space(self.args) if hp_space is None else hp_space
        objective = student_loss_objective if compute_objective is None else compute_objective
        self.search_history = []
        by_number: dict = {}

        def recorded_space(trial):
            values = space(trial)
            number = getattr(trial, "number", len(by_number))
            if number not in by_number:  # several processes call the space twice per trial
                by_number[number] = {"trial": number, "values": dict(values), "objective": None}
                self.search_history.append(by_number[number])
            return values

        def recorded_objective(metrics):
            value = objective(metrics)
            if self.search_history:  # the trial's last evaluation is its score
                self.search_history[-1]["objective"] = value
            return value

        try:
            best = super().hyperparameter_search(
                recorded_space, recorded_objective, n_trials, direction, backend, hp_name, **kwargs
            )
        finally:
            for name, value in saved.items():
                setattr(self.args, name, value)
            self.args._refresh_terms()
        if isinstance(best, BestRun) and best.run_id.isdigit() and int(best.run_id) in by_number:
            best = BestRun(best.run_id, best.objective, by_number[int(best.run_id)]["values"], best.run_summary)
        return best

    # ------------------------------------------------------------------ runs and checkpoints
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        resume_from_checkpoint = resume_target(self.args.output_dir, resume_from_checkpoint)
        # Refuses to mix this run's checkpoints with another run's, before anything is written.
        check_run_folder(self.args, self._fingerprint, resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    # ------------------------------------------------------------------ optimizer and checkpoints
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self._distillation_parameters() if id(p) not in known]
        terms = [{"params": params, "weight_decay": self.args.weight_decay}] if params else []
        learners = self.source.trainable_groups(self.args.weight_decay, self.get_decay_parameter_names, known)
        # Under FSDP, the preparation maps every optimizer parameter to one of the student's: the terms' group and the
        # peers' groups join the optimizer after it (create_scheduler), and are saved beside FSDP's optimizer state.
        self._late_groups = [*terms, *learners] if self.is_fsdp_enabled else []
        self._outside_fsdp = (len(terms), len(learners)) if self.is_fsdp_enabled else (0, 0)
        if not self.is_fsdp_enabled:
            for group in [*terms, *learners]:
                optimizer.add_param_group(group)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        for group in getattr(self, "_late_groups", ()):  # FSDP: the student's optimizer is prepared by now
            self.optimizer.add_param_group(group)
        self._late_groups = []
        if self.is_fsdp_enabled and self.accelerator.is_fsdp2:
            keep_root_gathered_until_backward(self.model)  # the chunked head's gradient goes into the whole head
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        terms, learners = self._groups_outside_fsdp()
        if not terms + learners:
            return super()._save_optimizer_and_scheduler(output_dir)
        with DetachedGroups(self.optimizer, terms + learners) as detached:
            super()._save_optimizer_and_scheduler(output_dir)
            saved = detached.state_dict()  # every process: the peers' sharded state is gathered collectively
            if self.args.should_save:
                if terms:  # replicated: every process holds the same terms state
                    torch.save(saved[0], os.path.join(output_dir, TERMS_OPTIMIZER_FILE))
                if learners:
                    torch.save(saved[terms:], os.path.join(output_dir, PEERS_OPTIMIZER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        terms, learners = self._groups_outside_fsdp()
        if checkpoint is None or not terms + learners:
            return super()._load_optimizer_and_scheduler(checkpoint)
        with DetachedGroups(self.optimizer, terms + learners) as detached:
            super()._load_optimizer_and_scheduler(checkpoint)
            saved = []
            if terms:
                saved.append(_read_outside_fsdp(checkpoint, TERMS_OPTIMIZER_FILE, "the terms' parameters"))
            if learners:
                saved += _read_outside_fsdp(checkpoint, PEERS_OPTIMIZER_FILE, "the peers' parameters")
            detached.load(saved, "optimizer state kept out of FSDP's (the terms' and the peers' parameters)")

    def _groups_outside_fsdp(self) -> tuple[int, int]:
        """How many of the optimizer's last groups hold the terms' parameters (0 or 1) and the peers' (then), kept
        out of FSDP2's optimizer state."""
        if not self.is_fsdp_enabled or self.optimizer is None:
            return 0, 0
        return getattr(self, "_outside_fsdp", (0, 0))

    def _distillation_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parts that are not the student's: the terms' own parameters (projections, heads)."""
        return [p for p in self.term_set.parameters() if p.requires_grad]

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.source.gather_checkpoint()  # every process: sharded state is gathered collectively
        if self.args.should_save and os.path.isdir(folder):
            self.term_set.save(folder)
            self.source.save_checkpoint(folder)
            # Last: its presence says the checkpoint is whole (hfkd.checkpoints); a kill before leaves none.
            write_run_file(folder, self._fingerprint)

    def _clip_grad_norm(self, model):
        # The student and the terms' parameters are one trainable system (as timm wraps them): clip their joint norm.
        extra = self._distillation_parameters()
        if extra and self.is_fsdp_enabled:
            norm = clip_joint_norm(self.accelerator, model, extra, self.args.max_grad_norm)
        elif not extra or self.is_deepspeed_enabled:
            norm = super()._clip_grad_norm(model)
        else:
            norm = self.accelerator.clip_grad_norm_([*model.parameters(), *extra], self.args.max_grad_norm)
        # Models that train beside the student (peers) on their own; the student's norm is the one logged. The call
        # above unscaled every gradient of the optimizer (fp16), which Accelerate allows once per step.
        self.source.clip_gradients(self.args.max_grad_norm)
        return norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, the files the terms offer the student beside it (`byot`'s exit heads,
        hfkd.early_exit) and each peer in `<output_dir>/peers/<name>` (in checkpoints too)."""
        super().save_model(output_dir, _internal_call)
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self.term_set.save_beside_student(folder)
        # Every process: sharded peers are gathered collectively; the main process writes.
        self.source.save_model(folder, self.processing_class)

    def _load_best_model(self) -> None:
        with self._checked_load(self.state.best_model_checkpoint, self.model, "load_best_model_at_end"):
            super()._load_best_model()
        self.source.load_best(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with self._checked_load(
            resume_from_checkpoint, model if model is not None else self.model, "resume_from_checkpoint"
        ):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.source.load_checkpoint(resume_from_checkpoint)
        self.term_set.load(resume_from_checkpoint)

    @contextlib.contextmanager
    def _checked_load(self, folder: str, model, setting: str):
        """Trainer loads a checkpoint's student weights with `load_state_dict(strict=False)` and only warns about
        what did not fit, which for a transformers-5 model with renamed modules (ViT) is most of it: the results it
        reports inside are completed (renamed weights copied in) or refused (hfkd.saved_weights)."""
        self._load_results = []
        try:
            yield
            for result in self._load_results:
                # `model` is the module Trainer called load_state_dict on: the result's names are its own.
                complete_load(model, folder, result.missing_keys, result.unexpected_keys, setting)
        finally:
            self._load_results = None

    def _issue_warnings_after_load(self, load_result) -> None:
        if getattr(self, "_load_results", None) is None:
            super()._issue_warnings_after_load(load_result)
        else:  # checked (and completed or refused) by _checked_load, not only warned about
            self._load_results.append(load_result)

    # ------------------------------------------------------------------ the step
    def get_train_dataloader(self):
        if getattr(self, "augmenter", None) is None or not self.augmenter.text:
            return super().get_train_dataloader()
        # Word augmentations change the text before it is tokenized: the loader hands over the rows, and
        # get_batch_samples augments and collates each micro-batch with the trainer's collator.
        collator, self.data_collator = self.data_collator, raw_rows
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def _augmented(self, batches: list) -> list:
        """Each micro-batch's augmented view (hfkd.augment), drawn from (seed, step, micro-batch, process): before
        Trainer counts the window's labels and before the split into the student's and the teachers' inputs, so
        that every model of the step reads the same view."""
        views = []
        for index, batch in enumerate(batches):
            rng = generator(self.args.seed, self.state.global_step, index, self.args.process_index)
            if isinstance(batch, RawRows):
                views.append(self._prepare_inputs(self.augmenter.view(batch, rng, self.data_collator)))
            else:
                views.append(self.augmenter.view(batch, rng))
        return views

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.augmenter is not None:
            batches = self._augmented(list(itertools.islice(epoch_iterator, num_batches)))
            epoch_iterator, num_batches = iter(batches), len(batches)
        if self._generation is not None:
            # On-policy / seq-KD (hfkd.on_policy): the window's micro-batches are replaced by generated ones first,
            # so that Trainer's num_items_in_batch and every term's units count the sequences the models will see.
            batches = list(itertools.islice(epoch_iterator, num_batches))
            teacher = self.accelerator.unwrap_model(self.teacher_model) if self.teacher_model is not None else None
            batches, on_policy = self._generation.replace(
                batches,
                self.state.global_step,
                self.accelerator.unwrap_model(self.model),
                teacher,
                self.args.process_index,
            )
            if batches and self.args.lmbda > 0:  # the share of on-policy micro-batches, logged as `on_policy`
                self._record({"on_policy": torch.tensor(on_policy / len(batches), device=device)}, "train")
            epoch_iterator, num_batches = iter(batches), len(batches)
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # A new accumulation window starts here. Trainer zeroes only the student's gradients after a step, so the
        # terms' gradients are cleared here, before this window's first backward.
        self.term_set.zero_grad(set_to_none=True)
        self.source.zero_grad()
        if self.step.distills and batch_samples:
            self.step.units.count_window(batch_samples, device)
        if batch_samples:
            self._train_windows += 1
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training and (self._predicting or not self.args.eval_with_teacher):
            return self._student_loss(model, inputs, return_outputs)
        if self.step.distills and not self.step.plan.probed:
            self._probe(inputs)
        with self.step.capturing(model) as modules:
            result = self.step(model, inputs, num_items_in_batch, modules)
        if model.training:
            self._stop_if_not_finite(result.logged)
        self._record(result.logged, "train" if model.training else "eval")
        return (result.loss, self.step.predictions(model, result.outputs)) if return_outputs else result.loss

    def _student_loss(self, model, inputs, return_outputs):
        """Evaluation of the student alone (predict(), or eval_with_teacher=False): its own loss, no teacher."""
        student_inputs, _, _ = self.step.split_inputs(model, inputs)
        loss, outputs = super().compute_loss(model, student_inputs, return_outputs=True)
        self._record({"task": loss}, "eval")
        return (loss, outputs) if return_outputs else loss

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test"):
        """`Trainer.predict`, with the student alone: predictions never need the teacher."""
        self._predicting = True
        try:
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._predicting = False

    def _task_loss(self, model, inputs: dict, num_items_in_batch, training: bool, accepts=None, uses_num_items=None):
        """A model's own loss on the labels by Trainer's path (so that task-only training is exactly Trainer's, label
        smoothing and compute_loss_func included), scaled like the terms: over the accumulation window.

        `accepts` / `uses_num_items`: another model's (a peer's) instead of the student's. Trainer.compute_loss reads
        `model_accepts_loss_kwargs`, so a peer's call runs on a view of this trainer that answers with the peer's."""
        if accepts is None:
            accepts, uses_num_items = self.model_accepts_loss_kwargs, self.step.plan.task_uses_num_items
        trainer = self if accepts == self.model_accepts_loss_kwargs else _WithLossKwargs(self, accepts)
        task_loss, outputs = Trainer.compute_loss(
            trainer, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        scaled_by_trainer = (accepts and num_items_in_batch is not None) or self.compute_loss_func is not None
        if scaled_by_trainer and self.compute_loss_func is None and not uses_num_items:
            # A per-batch mean that Trainer took for a sum over the accumulated count: undo its scaling.
            if self.args.average_tokens_across_devices:
                task_loss = task_loss / (self.accelerator.num_processes // self.get_tp_size())
            scaled_by_trainer = False
        if training and not scaled_by_trainer:
            task_loss = task_loss / self.step.accumulation_steps()
        return task_loss, outputs

    def _stop_if_not_finite(self, terms: dict[str, torch.Tensor]) -> None:
        # One host sync per step (Trainer's logging_nan_inf_filter already makes one); raising here, before
        # backward, keeps the bad update out of the weights and the last checkpoint good.
        values = torch.stack([value.detach().float().reshape(()) for value in terms.values()]) if terms else None
        if values is None or bool(torch.isfinite(values).all()):
            return
        listed = list(zip(terms, values.tolist(), strict=True))
        shown = ", ".join(f"{name}={value:.4g}" for name, value in listed)
        bad = [name for name, value in listed if not torch.isfinite(torch.tensor(value))]
        last, _ = last_complete_checkpoint(self.args.output_dir)
        raise NonFiniteLossError(
            f"Non-finite loss at step {self.state.global_step + 1}: {', '.join(bad)} went bad ({shown}). Training "
            f"stopped before this update; the last good checkpoint is {last or 'none (none saved yet)'}. Lower "
            "learning_rate, check this batch's inputs and labels, or (fp16) use bf16 or a higher temperature."
        )

    # ------------------------------------------------------------------ logging
    def _record(self, values: dict[str, torch.Tensor], mode: str) -> None:
        self._logged[mode].add(values)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add each term's mean over the steps since the last one
            logs = {**logs, **self._logged["train"].means(self._train_windows)}
            self._train_windows = 0
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._logged["eval"] = LoggedSums(self.args.world_size, self.accelerator.reduce)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # Each term's mean over the evaluation batches, returned by evaluate() and logged with its metrics.
        logged = self._logged["eval"]
        terms = logged.means(logged.count)
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in terms.items()})
        return output


def _read_outside_fsdp(checkpoint: str, name: str, what: str):
    path = os.path.join(checkpoint, name)
    if not os.path.isfile(path):
        raise ValueError(
            f"{checkpoint} holds no {name}, the optimizer state of {what} under FSDP: the checkpoint comes from "
            "another kind of run. Resume from a checkpoint of this run."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _student_from_model_init(model, args, trainer_args: tuple, trainer_kwargs: dict):
    """(the student, model_init): with model_init, its first student, built here (seeded as Trainer seeds it) so
    that the teachers are loaded and checked against it before Trainer is built; model_init is taken out of the
    arguments (Trainer refuses a model and a model_init together) and set on the trainer after."""
    model_init = trainer_kwargs.pop("model_init", None)
    if len(trainer_args) > 4 and trainer_args[4] is not None:  # Trainer's 7th positional argument
        raise ValueError("Pass model_init to DistillationTrainer as a keyword argument (model_init=...).")
    if model_init is None:
        return model, None
    if model is not None:
        raise ValueError("Pass either model= or model_init= to DistillationTrainer, not both.")
    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
    count = number_of_arguments(model_init)
    if count > 1:
        raise ValueError("model_init must take no argument or one (the trial).")
    model = model_init() if count == 0 else model_init(None)
    if model is None:
        raise ValueError("model_init returned None; it must return a new student.")
    return model, model_init


class _WithLossKwargs:
    """This trainer as `Trainer.compute_loss` sees it, but for a model whose forward takes (or not) the loss
    keywords: another model's loss is computed without changing the trainer's own `model_accepts_loss_kwargs`."""

    def __init__(self, trainer: DistillationTrainer, accepts: bool):
        self._trainer, self.model_accepts_loss_kwargs = trainer, accepts

    def __getattr__(self, name):
        return getattr(self._trainer, name)


def _text_collator(collator):
    """The collator inside hfkd's wrappers (missing labels, row ids, a cache) that tokenizes text rows itself
    (TwoTokenizerCollator, TextCollator), or None."""
    while not hasattr(collator, "text_columns") and hasattr(collator, "collator"):
        collator = collator.collator
    return collator if isinstance(collator, (TwoTokenizerCollator, TextCollator)) else None


def _text_collator_for_augmentation(args, teacher_tokenizer, trainer_args: tuple, trainer_kwargs: dict) -> None:
    """Word augmentations with one tokenizer and no collator given: rows stay text and `TextCollator` tokenizes
    each augmented batch with the student's tokenizer (processing_class)."""
    augmenter = Augmenter.from_config(args)
    if augmenter is None or not augmenter.text or teacher_tokenizer is not None:
        return
    if len(trainer_args) > 0 or trainer_kwargs.get("data_collator") is not None:
        return  # a given collator; checked before the first step
    tokenizer = trainer_kwargs.get("processing_class")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(
            f"augment={args.augment!r} changes words before tokenizing, so hfkd tokenizes each batch: pass the "
            "student's tokenizer as processing_class (or unset augment)."
        )
    trainer_kwargs["data_collator"] = TextCollator(
        tokenizer, args.tokenize_text_column, args.tokenize_text_pair_column, args.tokenize_max_length
    )
