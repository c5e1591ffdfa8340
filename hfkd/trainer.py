"""`DistillationTrainer`: `transformers.Trainer` plus a teacher and the distillation terms (`hfkd.terms`)."""

import contextlib
import copy
import dataclasses
import glob
import itertools
import json
import logging
import os
import shutil

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import checks
from .alignment import match_vocabularies
from .batch import (
    SPANS,
    TEACHER_ID,
    TEACHER_PREFIX,
    TEACHER_SPANS,
    probe_window,
    student_inputs,
    teacher_inputs,
    teacher_key,
)
from .cache import (
    ROW_COLUMN,
    CachedTeacherCollator,
    CachedTeacherOutput,
    TeacherCache,
    TeacherCacheError,
    cached_prefix,
    has_cached_outputs,
)
from .checkpoints import RUN_FILE, check_complete, describe_skipped, last_complete_checkpoint
from .config import DistillationConfig
from .ema import EMATeacher, EMAUpdate
from .errors import NonFiniteLossError
from .fingerprint import model_fingerprint
from .heads import accepts_logits_to_keep, base_module, capture_last_hidden, head_reproduces_logits, linear_head
from .mixing import MixedTeacherOutput, confidence_weights, fixed_weights, mixed_logits, routed_weights
from .models import (
    call_model,
    check_teacher_head,
    ensure_eager_attention,
    forward_keywords,
    load_teacher,
    load_teacher_with_info,
    prepare_teacher,
    unwrap_peft,
)
from .names import named_teachers
from .on_policy import (
    SequenceGeneration,
    check_dataset_prompts,
    check_prompt_room,
    generation_settings,
    is_causal_lm,
    prompt_positions,
)
from .peers import check_peer_settings, detached, load_peer, named_peers, peer_folder, save_peer
from .streams import ModelKind, model_kind
from .terms.base import Features, TermBatch, TokenAlignment, logits_of
from .terms.runner import ROW_IDS_KEY, RowIdCollator, TermSet, capture_modules, resolve_modules
from .two_tokenizers import (
    TwoTokenizerCollator,
    check_same_tokenizer,
    check_teacher_tokenizer,
    check_terms_across_tokenizers,
    load_teacher_tokenizer,
)
from .units import batch_size, unit_counts, unit_masks

logger = logging.getLogger(__name__)


# RUN_FILE (hfkd.checkpoints) is written in output_dir and in each checkpoint, last: which teacher and student the
# checkpoints belong to, and in a checkpoint that it was saved whole.


_OUTPUT_FEATURE_KEYS = (
    "hidden_states",
    "attentions",
    "encoder_hidden_states",
    "decoder_hidden_states",
    "encoder_attentions",
    "decoder_attentions",
    "cross_attentions",
)


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

        peers = self._named_peers(model, args, peer_models, teacher_model)
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if args.teacher_ema_decay is not None:
            if teacher is not None:
                raise ValueError(
                    "teacher_ema_decay makes the teacher a moving average of the student: pass no teacher_model (or "
                    "unset teacher_ema_decay to distil from this teacher)."
                )
            if model is None:
                raise ValueError("teacher_ema_decay needs the student (`model=`) to start the teacher from.")
            teacher = copy.deepcopy(model)  # the mean teacher starts as the student
        if teacher is None and not args.teacher_cache_dir and not peers:
            raise ValueError(
                "DistillationTrainer needs a teacher: pass `teacher_model=` (a model, Hub id or path), set "
                "`teacher_model_name_or_path` in DistillationConfig, give a teacher cache (`teacher_cache_dir`), set "
                "`teacher_ema_decay` for a mean teacher made from the student, or pass `peer_models=` (or "
                "`peer_model_name_or_path`) for deep mutual learning with peers instead of a teacher."
            )
        teachers = named_teachers(teacher) if teacher is not None else {}
        caches = _named_caches(args.teacher_cache_dir, list(teachers)) if args.teacher_cache_dir else {}
        count = max(len(teachers), len(caches), len(peers))
        if count < 2 and args.teacher_combine != "weights":
            raise ValueError(
                f"teacher_combine={args.teacher_combine!r} combines several teachers, but there is one; give "
                "teacher_model a list or dict of teachers, or leave teacher_combine at 'weights'."
            )
        if count < 2 and args.teacher_weights is not None:
            raise ValueError("teacher_weights weighs several teachers, but there is one; unset teacher_weights.")
        caches = {name: TeacherCache(path) for name, path in caches.items()}
        for cache in caches.values():
            cache.check_config(args)
        loaded = {}  # teachers loaded here by name: (name or path, transformers' loading info)
        for name, one in teachers.items():
            checks.check_teacher_argument(one)
            if isinstance(one, str):
                source = one
                one, info = load_teacher_with_info(source, model, args.teacher_model_init_kwargs)
                teachers[name], loaded[name] = one, (source, info)
            if one is model:
                raise ValueError(
                    "teacher_model is the student itself; for self-distillation pass a frozen copy, or set "
                    "teacher_ema_decay for a teacher that is a moving average of the student."
                )
        # Checked before Trainer creates output_dir.
        weights = fixed_weights(args.teacher_weights, list(teachers or caches or peers)) if count > 1 else None
        teacher_tokenizer = self._teacher_tokenizer_setup(
            model, args, teacher_processing_class, teachers, caches, peers, trainer_args, trainer_kwargs
        )

        # Trainer creates output_dir; every check below runs before the first step, and a failing one removes it.
        with checks.removing_new_output_dir(args.output_dir if args.should_save else None):
            super().__init__(model, args, *trainer_args, **trainer_kwargs)
            self._teacher_weights = weights
            self.teacher_processing_class = teacher_tokenizer
            self._setup_distillation(args, teachers, caches, peers, loaded)

    @staticmethod
    def _teacher_tokenizer_setup(model, args, given, teachers, caches, peers, trainer_args, trainer_kwargs):
        """A teacher with its own tokenizer (hfkd.two_tokenizers): loads and checks it, and collates with
        TwoTokenizerCollator unless a collator is given. Returns the tokenizer, or None."""
        value = given if given is not None else args.teacher_processing_class
        if value is None:
            if args.teacher_ema_decay is None:  # a mean teacher is a copy of the student: its ids are the student's
                student_tokenizer = trainer_kwargs.get("processing_class")
                if student_tokenizer is None and len(trainer_args) > 3:  # Trainer's 6th positional argument
                    student_tokenizer = trainer_args[3]
                for name, teacher in teachers.items():
                    role = "teacher" if len(teachers) == 1 else f"teacher {name!r}"
                    check_same_tokenizer(student_tokenizer, model, teacher, role)
            return None
        for name, present in (
            ("a teacher cache (teacher_cache_dir)", caches),
            ("peer_models", peers),
            ("teacher_ema_decay", args.teacher_ema_decay is not None),
            ("lmbda > 0 or seq_kd", args.lmbda > 0 or args.seq_kd),
        ):
            if present:
                raise ValueError(
                    f"teacher_processing_class (a teacher with its own tokenizer) cannot be combined with {name} yet; "
                    "drop one of them."
                )
        tokenizer = load_teacher_tokenizer(value)
        for teacher in teachers.values():
            check_teacher_tokenizer(tokenizer, teacher)
        if len(trainer_args) == 0 and trainer_kwargs.get("data_collator") is None:
            student_tokenizer = trainer_kwargs.get("processing_class")
            if student_tokenizer is None:
                raise ValueError(
                    "teacher_processing_class is set: pass the student's tokenizer as processing_class too, so that "
                    "hfkd tokenizes each text row for both models."
                )
            causal_lm = model is not None and is_causal_lm(unwrap_peft(model))
            for which in ("train_dataset", "eval_dataset"):
                _check_text_column(trainer_kwargs.get(which), which, args, causal_lm)
            trainer_kwargs["data_collator"] = TwoTokenizerCollator(
                student_tokenizer,
                tokenizer,
                max_length=args.tokenize_max_length,
                text_column=args.tokenize_text_column,
                text_pair_column=args.tokenize_text_pair_column,
                causal_lm=causal_lm,
            )
        return tokenizer

    @staticmethod
    def _named_peers(model, args: DistillationConfig, peer_models, teacher_model) -> dict[str, torch.nn.Module]:
        """The peers of deep mutual learning (hfkd.peers) by name, loaded and checked; {} without any."""
        peers = peer_models if peer_models is not None else args.peer_model_name_or_path
        if peers is None:
            return {}
        check_peer_settings(args, teacher_given=teacher_model is not None)
        if model is None:
            raise ValueError("peer_models learn beside the student: pass the student as `model=`.")
        peers = named_peers(peers)
        for name, one in peers.items():
            checks.check_teacher_argument(one, role="peer")
            if isinstance(one, str):
                peers[name] = one = load_teacher(one, model, None, role="peer")
            if one is model:
                raise ValueError(
                    f"The peer {name!r} is the student itself: mutual learning needs separate models. Pass another "
                    "model (e.g. the same architecture built with another seed), or set teacher_ema_decay to teach "
                    "the student with a moving average of itself."
                )
        return peers

    def _setup_distillation(
        self,
        args: DistillationConfig,
        teachers: dict[str, torch.nn.Module],
        caches: dict[str, TeacherCache],
        peers: dict[str, torch.nn.Module] | None = None,
        loaded: dict[str, tuple[str, dict]] | None = None,
    ) -> None:
        # compute_loss normalises every term over the whole accumulated batch itself (see get_batch_samples).
        self.loss_is_scaled_for_ga = True
        if not self.label_names and self.compute_loss_func is not None and args.label_names is None:
            # A plain nn.Module student has no `labels` in its forward, so Trainer would drop them from the batch;
            # its compute_loss_func (the task loss) and label-reading terms need them.
            self.label_names = ["labels"]

        peers = peers or {}
        self.term_set = TermSet(args.term_specs, tuple(teachers or caches or peers) or ("teacher",))
        # Before any needs(): terms that pick their submodules by name patterns resolve them from these names
        # (the same unwrapped models _capture hooks).
        self.term_set.bind_module_names(
            tuple(name for name, _ in unwrap_peft(self.accelerator.unwrap_model(self.model)).named_modules()),
            {name: tuple(n for n, _ in unwrap_peft(one).named_modules()) for name, one in teachers.items()},
        )
        # A teacher loaded here by name whose head transformers initialised at random teaches noise through the
        # terms that read its logits. (A teacher passed as a model carries no such record: it may have been trained
        # since it was loaded.)
        for name, (source, info) in (loaded or {}).items():
            readers = [
                spec.name
                for spec, term in zip(self.term_set.specs, self.term_set.instances_of(name), strict=True)
                if term.needs().logits
            ]
            role = "teacher" if len(teachers) == 1 else f"teacher {name!r}"
            check_teacher_head(teachers[name], info, source, readers, role)
        self._setup_peers(peers)
        self._matched_vocab = None
        if self.teacher_processing_class is not None:
            check_terms_across_tokenizers(dict(self.term_set.terms))
            if self.processing_class is not None and hasattr(self.processing_class, "get_vocab"):
                self._matched_vocab = match_vocabularies(
                    self.processing_class.get_vocab(), self.teacher_processing_class.get_vocab()
                )
        self._terms_wrapped: torch.nn.Module | None = None
        self._hooked: dict[str, dict[str, torch.nn.Module]] = {}  # side -> the submodules the terms read
        if self.term_set.needs().attentions:
            ensure_eager_attention(self.model, "student")
            for name, one in teachers.items():
                ensure_eager_attention(one, "teacher" if len(teachers) == 1 else f"teacher {name!r}")
            _warn_attention_dropout(unwrap_peft(self.model))
        for name, cache in caches.items():
            for term in self.term_set.instances_of(name):
                term.check_cache(cache)  # each term says whether a cache can serve it, or names what it lacks
        self._distills = len(self.term_set) > 0
        # Each teacher's cache by teacher name; `_cache` is the one cache of a one-teacher run.
        self._caches = caches
        self._cache = next(iter(caches.values())) if len(caches) == 1 else None
        # Each teacher by name (one teacher: "teacher"); `teacher_model` is the first, for code that knows one.
        self.teachers = {name: prepare_teacher(one, self.accelerator) for name, one in teachers.items()}
        self.teacher_model = next(iter(self.teachers.values()), None)
        self._ema = (
            self._setup_ema(self.accelerator.unwrap_model(self.teacher_model))
            if args.teacher_ema_decay is not None
            else None
        )
        self._teacher_accepts_use_cache = {
            name: "use_cache" in forward_keywords(unwrap_peft(one))[0] for name, one in teachers.items()
        }
        if self._teacher_weights is not None:
            self._teacher_weights = self._teacher_weights.to(args.device)
        if args.teacher_combine == "teacher_id":
            self._check_teacher_ids()

        self._kind: ModelKind = model_kind(unwrap_peft(self.model), self._loss_shifts_labels)
        self._window_counts: dict[str, torch.Tensor] | None = None
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._eval_batches = 0
        self._train_windows = 0  # optimizer steps (accumulation windows) since the last training log
        self._task_uses_num_items = True  # measured in _probe
        # Causal LMs: base modules and linear heads of (student, teacher) when a term runs on the heads by chunks
        # (TermSet.head_term; planned in _probe).
        self._chunk_heads: tuple[torch.nn.Module, torch.nn.Linear, torch.nn.Module, torch.nn.Linear] | None = None

        self._probed = False
        self._predicting = False
        self._student_takes: tuple[frozenset[str], bool] | None = None  # the student forward's (_student_flags)
        self._check_data()
        self._generation = self._setup_generation(args, teachers, peers)
        self._term_row_ids = self._add_row_ids() if self.term_set.needs().row_ids else False
        # Taken before any forward pass: heads fill config fields such as `problem_type` on first use.
        self._fingerprint = self._run_fingerprint()
        if caches:
            self._use_caches(caches)
        if self._distills:
            self._probe()

    # ------------------------------------------------------------------ set-up
    def _setup_ema(self, teacher: torch.nn.Module) -> EMATeacher:
        """The mean teacher (hfkd.ema): checks, then its update after every optimizer step."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "teacher_ema_decay with DeepSpeed or FSDP: the student's weights are sharded, so no process holds "
                "them whole to average; train without teacher_ema_decay, or on one device or with DDP."
            )
        student = self.accelerator.unwrap_model(self.model)
        if self.optimizer is not None:  # `optimizers=` gave one: it must own every trainable weight to average
            owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            missing = [n for n, p in student.named_parameters() if p.requires_grad and id(p) not in owned]
            if missing:
                raise ValueError(
                    f"teacher_ema_decay averages the student's weights after each optimizer step, but the optimizer "
                    f"given by `optimizers=` does not update {len(missing)} trainable parameters (e.g. {missing[:3]}). "
                    "Build it over all of model.parameters(), or freeze those (requires_grad=False)."
                )
        ema = EMATeacher(teacher, student, self.args.teacher_ema_decay)
        self.add_callback(EMAUpdate(ema, lambda: self.accelerator.optimizer_step_was_skipped))
        return ema

    def _setup_peers(self, peers: dict[str, torch.nn.Module]) -> None:
        """Deep mutual learning (hfkd.peers): each peer trains beside the student, with the response terms against the
        student and the other peers (its own TermSet, never with state: those terms read only logits)."""
        self.peers: dict[str, torch.nn.Module] = {}
        self._peer_terms: dict[str, TermSet] = {}
        self._peers_wrapped: dict[str, torch.nn.Module] = {}
        self._peer_loss_kwargs: dict[str, tuple[bool, bool]] = {}  # (accepts loss kwargs, divides by num_items)
        if not peers:
            return
        if not len(self.term_set):
            raise ValueError(
                "peer_models are set but no term compares the models (logit_weight=0 and no `terms`): the peers would "
                "train alone beside the student. Set logit_weight > 0 (the DML paper: 1, with temperature 1)."
            )
        features = self.term_set.feature_terms()
        if features:
            raise ValueError(
                f"Peers learn from each other's outputs (deep mutual learning), so every term must read only the "
                f"logits (such as logit and dkd), but {features} read features; drop them (hidden_weight=0, "
                "attention_weight=0, no such `terms`), or distil from a frozen teacher instead."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "peer_models with DeepSpeed or FSDP: each peer would need its own sharded engine; train the peers with "
                "DDP or on one device."
            )
        if self.optimizer is not None:  # `optimizers=` gave one: it must also update every peer
            owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            for name, peer in peers.items():
                if any(p.requires_grad and id(p) not in owned for p in peer.parameters()):
                    raise ValueError(
                        f"The optimizer given by `optimizers=` does not update the peer {name!r}, which trains beside "
                        "the student: build it over the student's and every peer's parameters, or let "
                        "DistillationTrainer create it."
                    )
        adapted = [name for name, peer in peers.items() if hasattr(peer, "peft_config")]
        if adapted:
            raise ValueError(
                f"The peers {adapted} carry peft adapters, which hfkd does not yet save and restore for peers; merge "
                "them (merge_and_unload()) or pass the plain models."
            )
        for name, peer in peers.items():
            peer.to(self.args.device)
            peer.train()
            others = ("student", *(n for n in peers if n != name))
            terms = TermSet(self.args.term_specs, others)
            terms.bind_module_names((), {})
            self.peers[name] = peer
            self._peer_terms[name] = terms
            self._peers_wrapped[name] = self.accelerator.prepare_model(peer)  # DDP: its own gradient all-reduce
            self._peer_loss_kwargs[name] = (_accepts_loss_kwargs(unwrap_peft(peer)), True)

    def _setup_generation(self, args: DistillationConfig, teachers: dict, peers: dict) -> SequenceGeneration | None:
        """On-policy distillation (`lmbda`) and sequence-level KD (`seq_kd`), hfkd.on_policy: checks, then the scheme
        `get_batch_samples` runs; None when neither is on."""
        if args.lmbda == 0 and not args.seq_kd:
            return None
        which = "lmbda > 0" if args.lmbda > 0 else "seq_kd"
        if peers:
            raise ValueError(
                f"{which} with peer_models (deep mutual learning) is not supported; drop the peers, or set lmbda=0 "
                "and seq_kd=False."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"{which} generates with the whole model, which DeepSpeed and FSDP shard; train on one device or with "
                "DDP, or set lmbda=0 and seq_kd=False."
            )
        student = unwrap_peft(self.accelerator.unwrap_model(self.model))
        if args.lmbda > 0 and not (self._kind.shifts_labels and is_causal_lm(student)):
            raise ValueError(
                f"lmbda={args.lmbda} makes the student generate completions, which needs a decoder-only causal "
                f"language model (a *ForCausalLM); the student is {type(student).__name__}. Set lmbda=0."
            )
        models = [unwrap_peft(self.accelerator.unwrap_model(t)) for t in teachers.values()]
        generators = [student] if args.lmbda > 0 else []
        if args.seq_kd:
            if len(self.teachers) != 1:
                raise ValueError(
                    "seq_kd trains the student on sequences the teacher generates, so it needs one teacher model "
                    f"(got {len(self.teachers)}: {list(self.teachers) or 'a teacher cache'}); pass one teacher_model, "
                    "or set seq_kd=False."
                )
            if not (self._kind.shifts_labels and is_causal_lm(models[0])):
                raise ValueError(
                    f"seq_kd makes the teacher generate the targets, which needs decoder-only causal language models "
                    f"(*ForCausalLM); the student is {type(student).__name__}, the teacher "
                    f"{type(models[0]).__name__}. Set seq_kd=False."
                )
            generators.append(models[0])
        settings = generation_settings(args, generators, [student, *models], self.processing_class)
        # Every row's prompt before the first step: the stored columns when the collator passes them through, and
        # the first collated batch (a collator that builds labels, an iterable data set).
        import datasets

        dataset = self.train_dataset
        if (
            isinstance(dataset, datasets.Dataset)
            and checks.collator_kind(self.data_collator) == "plain"
            and "labels" in (checks.visible_columns(dataset) or [])
        ):
            check_dataset_prompts(dataset, settings.max_positions)
        if dataset is not None:
            where = "the first batch of train_dataset"
            check_prompt_room(prompt_positions(self._probe_batch(), where), settings, where)
        return SequenceGeneration(args.lmbda, args.seq_kd, settings, args.seed)

    def _add_row_ids(self) -> bool:
        """Training batches carry each row's index in the data (for terms with per-row memory, such as CRD)."""
        import datasets

        if not isinstance(self.train_dataset, datasets.Dataset):
            names = [n for n, t in self.term_set.terms.items() if t.needs().row_ids]
            raise ValueError(
                f"The terms {names} keep a memory per training row, so they need a datasets.Dataset train_dataset "
                f"(got {type(self.train_dataset).__name__}); convert it with datasets.Dataset.from_list or drop them."
            )
        if ROW_COLUMN not in self.train_dataset.column_names:
            self.train_dataset = self.train_dataset.add_column(ROW_COLUMN, list(range(len(self.train_dataset))))
        self.data_collator = RowIdCollator(self.data_collator)
        return True

    def _use_caches(self, caches: dict[str, TeacherCache]) -> None:
        """Checks each cache against this run and routes the training rows' cached outputs into their batches."""
        if self.train_dataset is None:
            raise ValueError("teacher_cache_dir is set but there is no train_dataset to read it for.")
        for name, cache in caches.items():
            teacher = self.teachers.get(name)
            unwrapped = self.accelerator.unwrap_model(teacher) if teacher is not None else None
            cache.check_run(self.train_dataset, self.data_collator, unwrapped, self.processing_class)
        # Rows carry their index through shuffling and sampling; the collator fetches their cached outputs.
        self.train_dataset = self.train_dataset.add_column(ROW_COLUMN, list(range(len(self.train_dataset))))
        self.data_collator = CachedTeacherCollator(self.data_collator, caches)
        if self.eval_dataset is not None and not self.teachers:
            logger.warning(
                "Training reads the teacher cache and no teacher was given: evaluation reports the task loss only "
                "(pass teacher_model= as well to evaluate the distillation terms)."
            )

    def _limits(self) -> tuple[checks.ModelLimits, dict[str, checks.ModelLimits]]:
        """What the student and each teacher accept, read from their configs (see hfkd.checks)."""
        student = checks.model_limits(self.accelerator.unwrap_model(self.model), "student")
        if self.label_names:  # Trainer's label names (args.label_names or the model's own)
            student = dataclasses.replace(student, label_names=tuple(self.label_names))
        if self.peers:  # a peer must fit the data and the student's label space as a teacher would
            return student, {name: checks.model_limits(p, f"peer {name!r}") for name, p in self.peers.items()}
        if not self.teachers:
            return student, {name: cache.teacher_limits() for name, cache in self._caches.items()}
        role = "teacher" if len(self.teachers) == 1 else "teacher {!r}"
        return student, {
            name: checks.model_limits(self.accelerator.unwrap_model(one), role.format(name))
            for name, one in self.teachers.items()
        }

    def _check_data(self) -> None:
        """Data-set checks before the first step, without a forward: rows, columns, labels, token ids, lengths."""
        student, teachers = self._limits()
        task_loss = self.args.task_weight > 0
        for teacher in teachers.values():
            # A teacher with its own tokenizer has its own vocabulary: only a shared label space must match.
            own_vocabulary = self.teacher_processing_class is not None and student.label_kind == "vocabulary"
            by_class = any(
                term.needs().logits and not type(term).across_vocabularies for term in self.term_set.terms.values()
            )
            checks.check_logit_heads(student, teacher, by_class and not own_vocabulary)
            for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
                # Evaluation without labels is legitimate (no loss, predictions only); training without them is not.
                checks.check_dataset(
                    dataset,
                    name,
                    student,
                    teacher,
                    self.data_collator,
                    task_loss=task_loss,
                    require_labels=name == "train_dataset",
                )

    def _check_teacher_ids(self) -> None:
        """teacher_combine='teacher_id': each data set names a known teacher in every row."""
        import datasets

        for which, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            if not isinstance(dataset, datasets.Dataset):
                continue  # other data sets are checked batch by batch
            if TEACHER_ID not in dataset.column_names:
                raise ValueError(
                    f"teacher_combine='teacher_id', but {which} has no {TEACHER_ID!r} column; add one holding each "
                    f"row's teacher index (0..{len(self.teachers) - 1}: {list(self.teachers)})."
                )
            ids = dataset.unique(TEACHER_ID)
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.teachers)]
            if bad:
                raise ValueError(
                    f"{which}[{TEACHER_ID!r}] holds {sorted(map(str, bad))[:5]}, which name no teacher; use the "
                    f"teacher's index, 0..{len(self.teachers) - 1} for {list(self.teachers)}."
                )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [teacher_key(c) for c in self._signature_columns if not c.startswith(TEACHER_PREFIX)]
        extra += [ROW_COLUMN, TEACHER_ID, SPANS, TEACHER_SPANS]
        if isinstance(self.data_collator, TwoTokenizerCollator):  # it tokenizes the text columns itself
            extra += sorted(self.data_collator.text_columns())
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
        """Runs both models on two examples before training to check that the terms can be computed.

        This is where mismatched vocabularies, layer maps, head counts and widths fail, before the first step, and
        where the terms build their parameters (projections, heads) so that the optimizer and DDP know them from the
        start. A trainer built without data is probed on its first batch instead (`batch`): the checks and the
        chunked head path then still apply, but nothing trainable can be added to an optimizer that exists already.
        """
        first_batch = batch is not None
        batch = batch if batch is not None else self._probe_batch()
        if batch is None:
            return  # planned on the first batch compute_loss sees
        self._probed = True
        student, teachers = self._limits()
        for teacher in teachers.values():
            checks.check_probe_batch(
                batch,
                student,
                teacher,
                task_loss=self.args.task_weight > 0,
                require_labels=self.train_dataset is not None,  # the probe batch may come from eval_dataset
            )
        full, batch = batch, probe_window(batch)  # the checks above read every token; the forwards a window
        candidates = self._chunk_candidates()
        s_base, t_base = (candidates[0], candidates[2]) if candidates else (None, None)
        was_training = self.model.training
        self.model.eval()
        for peer in self.peers.values():
            peer.eval()
        try:
            with (
                torch.no_grad(),
                capture_last_hidden(s_base) as s_last,
                capture_last_hidden(t_base) as t_last,
                self._capture("student") as s_modules,
                self._capture_teachers() as t_modules,
            ):
                student_inputs, teacher_inputs, _ = self._split_inputs(batch)
                student_inputs.pop("labels", None)  # only shapes matter here, not the loss
                student_out = self.model(**student_inputs, **self._student_flags())
                teacher_outs = self._teacher_outputs(batch, teacher_inputs)
        finally:
            self.model.train(was_training)
            for peer in self.peers.values():
                peer.train()
        teacher_out = next(iter(teacher_outs.values())) if teacher_outs else None
        s_logits = logits_of(student_out)
        if s_logits is not None:
            # The class guess can be wrong for custom heads; the logits' rank is the truth.
            self._kind.token_level = s_logits.dim() >= 3
        self._setup_terms(student_out, s_modules, teacher_outs, t_modules, batch, first_batch)
        self._setup_peer_terms(student_out, teacher_outs, batch)
        # Two losses are compared there: the window only if it holds a label (a long prompt masks its first tokens).
        labels = batch.get("labels")
        if labels is not None and hasattr(labels, "ne") and not bool(labels.ne(-100).any()):
            batch = full
        self._task_uses_num_items = self._measure_task_normalisation(self.model, batch)
        for name, peer in self.peers.items():
            accepts, _ = self._peer_loss_kwargs[name]
            self._peer_loss_kwargs[name] = (accepts, self._measure_task_normalisation(peer, batch, accepts))
        if candidates:
            s_head, t_head = candidates[1], candidates[3]
            cached = isinstance(teacher_out, CachedTeacherOutput)
            if (
                head_reproduces_logits(s_last.value, s_head, logits_of(student_out))
                and (cached or head_reproduces_logits(t_last.value, t_head, logits_of(teacher_out)))
                and (self.args.task_weight == 0 or self._task_uses_num_items)
            ):
                # A teacher not checked here (the probe read the cache) keeps the full logits when it runs.
                self._chunk_heads = candidates if not cached else (*candidates[:2], None, None)
            else:
                logger.warning(
                    "The student's or teacher's logits are not a plain linear head of its last hidden states "
                    "(soft-capping or logit scaling?); the %s term uses the full logits (its chunk size is ignored).",
                    self.term_set.head_term()[0],
                )

    def _setup_terms(self, student_out, s_modules, teacher_outs, t_modules, batch, first_batch: bool) -> None:
        """The configured terms see real outputs once, check them and build their parameters, before the optimizer."""
        student = Features(student_out, s_modules, self._kind)
        teachers = {name: Features(out, t_modules[name], self._kind) for name, out in (teacher_outs or {}).items()}
        for name, side in teachers.items():
            if isinstance(side.outputs, CachedTeacherOutput):
                self._check_cached_layers(student, side, name)
        mixed, _ = self._combined_teacher(teachers, batch)
        self.term_set.setup(student, teachers, self._term_batch(batch, training=False), mixed)
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
        first = next(self.model.parameters())
        self.term_set.to(device=first.device)
        if self.term_set.has_state():
            self._terms_wrapped = self.accelerator.prepare_model(self.term_set)

    def _setup_peer_terms(self, student_out, peer_outs: dict | None, batch: dict) -> None:
        """Each peer's terms see real outputs once (and each peer's logits must have the student's shape)."""
        if not self.peers:
            return
        s_logits = logits_of(student_out)
        for name, out in peer_outs.items():
            p_logits = logits_of(out)
            if s_logits is not None and (p_logits is None or p_logits.shape != s_logits.shape):
                raise ValueError(
                    f"The peer {name!r} gives logits of shape {None if p_logits is None else tuple(p_logits.shape)} "
                    f"where the student's are {tuple(s_logits.shape)}: peers must solve the student's task with "
                    "the same labels (a model of the same task head and label count or vocabulary)."
                )
        sides = {"student": Features(student_out, {}, self._kind)}
        sides.update({name: Features(out, {}, self._kind) for name, out in peer_outs.items()})
        term_batch = self._term_batch(batch, training=False)
        for name, terms in self._peer_terms.items():
            others = {other: sides[other] for other in terms.teachers}
            mixed, _ = self._combined_teacher(others, batch, terms)
            terms.setup(sides[name], others, term_batch, mixed)

    def _check_cached_layers(self, student: Features, teacher: Features, teacher_name: str) -> None:
        """Every teacher hidden state a term reads must be in the teacher cache (checked on the probe batch)."""
        stored, s_states = teacher.hidden_states, student.hidden_states
        if stored is None or s_states is None:
            return  # the term's own setup names what is missing
        held = [i for i, state in enumerate(stored) if state is not None]
        for term in self.term_set.instances_of(teacher_name):
            name = term.name
            if not term.needs().hidden_states:
                continue
            wanted = term.teacher_hidden_layers(len(s_states), len(stored))
            missing = sorted(set(wanted) - set(held)) if wanted is not None else ["?"]
            if missing:
                raise TeacherCacheError(
                    f"The term {name!r} reads teacher hidden_states[{missing[0]}], but the teacher cache holds "
                    f"{held}; rebuild it with `hfkd cache` for this student and these terms."
                )

    def _capture(self, side: str, teacher: str = "teacher"):
        """Records the submodule outputs the terms asked for, during that model's forwards inside the block."""
        key = side if side == "student" else f"teacher:{teacher}"
        if key not in self._hooked:
            if side == "student":
                names, model = self.term_set.needs().student_modules, self.model
            else:
                names, model = self.term_set.teacher_modules(teacher), self.teachers.get(teacher)
            model = unwrap_peft(self.accelerator.unwrap_model(model)) if model is not None and names else model
            self._hooked[key] = resolve_modules(
                model, names, side if len(self.teachers) < 2 else f"teacher {teacher!r}"
            )
        return capture_modules(self._hooked[key])

    @contextlib.contextmanager
    def _capture_teachers(self):
        """`_capture` for every teacher: {teacher name: its captured submodule outputs}."""
        with contextlib.ExitStack() as stack:
            yield {name: stack.enter_context(self._capture("teacher", name)) for name in self.term_set.teachers}

    def _combined_teacher(self, teachers: dict[str, Features], batch: dict, term_set: TermSet | None = None):
        """Several teachers: the combined teacher the response terms read, and the weights `[K]` of the others.

        `term_set`: a peer's terms, whose teachers (the student and the other peers) weigh the same."""
        term_set = term_set if term_set is not None else self.term_set
        if not term_set.multi:
            return None, None
        logits = [side.logits for side in teachers.values()]
        if term_set is self.term_set:
            weights = self._example_weights(logits, batch)
        else:
            weights = torch.full((batch_size(batch), len(logits)), 1.0 / len(logits), device=self.args.device)
        mixed = None
        if term_set.response:
            if any(z is None for z in logits):
                raise ValueError("A teacher returned no `logits`, which the response terms of several teachers mix.")
            z = mixed_logits(logits, weights, self.args.temperature, self.args.logit_loss)
            mixed = Features(MixedTeacherOutput(z), {}, self._kind)
        return mixed, weights.mean(0)

    def _example_weights(self, logits: list, batch: dict) -> torch.Tensor:
        """Each example's weight of each teacher, `[B, K]` (teacher_combine; hfkd.mixing)."""
        mode, count = self.args.teacher_combine, batch_size(batch)
        if mode == "weights":
            return self._teacher_weights.expand(count, -1)
        if mode == "teacher_id":
            ids = batch.get(TEACHER_ID)
            if not isinstance(ids, torch.Tensor):
                raise ValueError(
                    f"teacher_combine='teacher_id', but a batch came without a {TEACHER_ID!r} column; give each row "
                    "its teacher's index."
                )
            return routed_weights(ids, len(self.teachers))
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor) or any(z is None for z in logits):
            raise ValueError(
                "teacher_combine='confidence' weighs each teacher by its cross-entropy on the labels: the batch needs "
                "`labels` and every teacher `logits`."
            )
        return confidence_weights(logits, labels, self._kind.shifts_labels)

    def _term_batch(self, batch: dict, training: bool, masks: dict | None = None, counts: dict | None = None):
        masks = masks if masks is not None else unit_masks(batch, self._kind)
        counts = counts if counts is not None else self._normalisers(masks, batch, False)[0]
        stream = "encoder" if self._kind.encoder_decoder else "main"
        labels = batch.get("labels")
        rows = batch.get(ROW_IDS_KEY)
        alignment = None
        if isinstance(batch.get(SPANS), torch.Tensor):  # a teacher with its own tokenizer (hfkd.two_tokenizers)
            matched = self._matched_vocab or (None, None)
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
            mask=masks.get(stream),
            num_examples=batch_size(batch),
            logit_mask=masks.get("logit"),
            row_ids=rows if isinstance(rows, torch.Tensor) else None,
            training=training,
            num_rows=len(self.train_dataset) if self._term_row_ids else None,
            masks=masks,
            counts=counts,
        )

    def _term_values(
        self,
        student,
        teachers,
        batch: TermBatch,
        scale,
        training,
        skip=None,
        mixed=None,
        teacher_weights=None,
        term_set: TermSet | None = None,
    ):
        """Each configured term's value (but `skip`'s), normalised over its unit (see hfkd.terms.base); with several
        teachers also each teacher's (`<name>/<teacher>`). `term_set`: a peer's terms instead of the student's."""
        if term_set is None:
            term_set = self.term_set
            module = self._terms_wrapped if self._terms_wrapped is not None else term_set
        else:
            module = term_set
        raw = module(student, teachers, batch, skip=skip, mixed=mixed, teacher_weights=teacher_weights)
        stream = "encoder" if self._kind.encoder_decoder else "main"
        counts = batch.counts
        values = {}
        for name, value in raw.items():
            unit = term_set.unit_of(name)
            if unit == "mixed":  # divided by its counts already; `scale` undoes DDP's mean over processes
                value = value * scale
            elif unit == "batch":
                # A micro-batch value: the mean over the window's micro-batches (and, through DDP, processes).
                value = value / self._accumulation_steps if training else value
            else:
                count = {"tokens": counts.get(stream), "logits": counts.get("logit")}.get(unit)
                value = value * (scale / (count if count is not None else counts["examples"]))
            values[f"distill/{name}"] = value
        return values

    def _chunk_candidates(self):
        """(student base, student head, teacher base, teacher head) if a term can run on the heads by chunks."""
        if self.term_set.head_term() is None or self.peers:
            return None
        kind = self._kind
        if not (kind.shifts_labels and kind.token_level) or kind.encoder_decoder:
            return None
        # Sharded parameters (ZeRO-3, FSDP) exist only inside their module's forward; the label smoother and
        # compute_loss_func need the full logits.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return None
        models = [unwrap_peft(self.accelerator.unwrap_model(self.model))]
        if self.teacher_model is not None:
            models.append(unwrap_peft(self.accelerator.unwrap_model(self.teacher_model)))
        parts = [part for m in models for part in (base_module(m), linear_head(m))]
        if any(part is None for part in parts) or not all(accepts_logits_to_keep(m) for m in models):
            logger.info("The logits are computed whole: a model has no plain linear head or no logits_to_keep.")
            return None
        return tuple(parts) if len(parts) == 4 else (*parts, None, None)

    def _measure_task_normalisation(self, model, batch: dict, accepts_loss_kwargs: bool | None = None) -> bool:
        """Whether `model`'s own loss divides by `num_items_in_batch` (the student's, or a peer's).

        Trainer assumes every model that takes `**kwargs` does, and then skips its division by the accumulation
        steps (and multiplies by the number of processes). Many heads (BERT's, T5's) return a per-batch mean
        anyway, which would make the task term `gradient_accumulation_steps` (x processes) times too large next to
        the distillation terms. Two evaluations with different counts settle it.
        """
        accepts = self.model_accepts_loss_kwargs if accepts_loss_kwargs is None else accepts_loss_kwargs
        if self.args.task_weight == 0 or not accepts or self.compute_loss_func is not None:
            return True
        student_inputs, _, _ = self._split_inputs(batch)
        if "labels" not in student_inputs:
            return True
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = [
                    _get(model(**student_inputs, num_items_in_batch=torch.tensor(count)), "loss")
                    for count in (1.0, 2.0)
                ]
        finally:
            model.train(was_training)
        if all(isinstance(loss, torch.Tensor) for loss in losses):
            return not torch.allclose(losses[0], losses[1])
        return True

    # ------------------------------------------------------------------ runs and checkpoints
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        resume_from_checkpoint = self._resume_target(resume_from_checkpoint)
        self._check_output_dir(resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _run_fingerprint(self) -> dict:
        student = model_fingerprint(self.accelerator.unwrap_model(self.model), with_name=False)
        if self.peers:
            return {
                "peers": {n: model_fingerprint(p, with_name=False) for n, p in self.peers.items()},
                "student": student,
            }
        if self.term_set.multi:
            teachers = {n: model_fingerprint(self.accelerator.unwrap_model(t)) for n, t in self.teachers.items()}
            for name, cache in self._caches.items():  # a cache stands for a teacher not given
                teachers.setdefault(name, {k: v for k, v in cache.teacher.items() if k != "weights_sha256"})
            return {"teachers": teachers, "student": student}
        if self.teacher_model is not None:
            teacher = model_fingerprint(self.accelerator.unwrap_model(self.teacher_model))
        else:  # the cache stands for the teacher
            teacher = {k: v for k, v in self._cache.teacher.items() if k != "weights_sha256"}
        return {"teacher": teacher, "student": student}

    def _resume_target(self, resume_from_checkpoint):
        """`True` becomes the newest complete checkpoint, passing over any the run was killed while saving (Trainer
        would take the newest folder and fail on its missing trainer_state.json); an incomplete one given by path is
        refused (hfkd.checkpoints)."""
        if resume_from_checkpoint is True:
            path, skipped = last_complete_checkpoint(self.args.output_dir)
            if skipped:
                if path is None:
                    raise ValueError(
                        f"resume_from_checkpoint=True: {self.args.output_dir} holds no complete checkpoint, only "
                        f"{describe_skipped(skipped)}, cut short while saving. Start without resume_from_checkpoint."
                    )
                logger.warning(
                    "Resuming from %s, the newest complete checkpoint; skipped %s: the run stopped while saving it.",
                    path,
                    describe_skipped(skipped),
                )
            return path if path is not None else True  # none at all: Trainer says so
        if isinstance(resume_from_checkpoint, str) and os.path.isdir(resume_from_checkpoint):
            check_complete(resume_from_checkpoint)
        return resume_from_checkpoint

    def _check_output_dir(self, resume_from_checkpoint) -> None:
        """Refuses to mix this run's checkpoints with another run's, before anything is written."""
        out = self.args.output_dir
        fingerprint = self._fingerprint
        if resume_from_checkpoint:
            path = get_last_checkpoint(out) if resume_from_checkpoint is True else resume_from_checkpoint
            stored = _read_run_file(path) if path else None
            if stored is not None and stored != fingerprint:
                raise ValueError(
                    f"{path} was written by another run (teacher/student {_describe(stored)}; this run: "
                    f"{_describe(fingerprint)}). Resume with the models that made it, or start without "
                    "resume_from_checkpoint."
                )
        elif glob.glob(os.path.join(out, f"{PREFIX_CHECKPOINT_DIR}-*")):
            stored = _read_run_file(out)
            if stored != fingerprint:
                if not self.args.overwrite_output_dir:
                    raise ValueError(
                        f"output_dir {out} holds checkpoints of another run ({_describe(stored)}; this run: "
                        f"{_describe(fingerprint)}). Choose another output_dir, resume that run, or set "
                        "overwrite_output_dir=True to delete its checkpoints."
                    )
                if self.args.should_save:
                    for folder in glob.glob(os.path.join(out, f"{PREFIX_CHECKPOINT_DIR}-*")):
                        shutil.rmtree(folder)
        if self.args.should_save:
            os.makedirs(out, exist_ok=True)
            _write_run_file(out, fingerprint)

    # ------------------------------------------------------------------ optimizer and checkpoints
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self._distillation_parameters() if id(p) not in known]
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        for peer in self.peers.values():
            # The settings Trainer gives the student's parameters (no decay on biases and norms), one group each.
            decay = set(self.get_decay_parameter_names(peer))
            named = [(n, p) for n, p in peer.named_parameters() if p.requires_grad and id(p) not in known]
            for wd, chosen in ((self.args.weight_decay, True), (0.0, False)):
                group = [p for n, p in named if (n in decay) == chosen]
                if group:
                    optimizer.add_param_group({"params": group, "weight_decay": wd})
        return optimizer

    def _distillation_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parts that are not the student's: the terms' own parameters (projections, heads)."""
        return [p for p in self.term_set.parameters() if p.requires_grad]

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            self.term_set.save(folder)
            if self._ema is not None:
                self._ema.save(folder)
            # Last: its presence says the checkpoint is whole (hfkd.checkpoints); a kill before leaves none.
            _write_run_file(folder, self._fingerprint)

    def _clip_grad_norm(self, model):
        # The student and the terms' parameters are one trainable system (as timm wraps them): clip their joint norm.
        extra = self._distillation_parameters()
        if not extra or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            norm = super()._clip_grad_norm(model)
        else:
            norm = self.accelerator.clip_grad_norm_([*model.parameters(), *extra], self.args.max_grad_norm)
        # Each peer on its own, as if it trained alone (hfkd.peers); the student's norm is the one logged. The call
        # above unscaled every gradient of the optimizer (fp16), which Accelerate allows once per step.
        for peer in self.peers.values():
            torch.nn.utils.clip_grad_norm_(peer.parameters(), self.args.max_grad_norm)
        return norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, and each peer in `<output_dir>/peers/<name>` (in checkpoints too)."""
        super().save_model(output_dir, _internal_call)
        if self.peers and self.args.should_save:
            folder = output_dir if output_dir is not None else self.args.output_dir
            for name, peer in self.peers.items():
                save_peer(peer, peer_folder(folder, name), self.processing_class)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        for name, peer in self.peers.items():  # the peers as they were at the student's best checkpoint
            load_peer(peer, peer_folder(self.state.best_model_checkpoint, name))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, peer in self.peers.items():
            load_peer(peer, peer_folder(resume_from_checkpoint, name))
        if self._ema is not None:
            self._ema.load(resume_from_checkpoint)
        self.term_set.load(resume_from_checkpoint)

    # ------------------------------------------------------------------ the step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
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
        for peer in self.peers.values():
            peer.zero_grad(set_to_none=True)
        if self._distills and batch_samples:
            self._window_counts = self._count_units(batch_samples, device)
        if batch_samples:
            self._train_windows += 1
        return batch_samples, num_items_in_batch

    def _count_units(self, batch_samples: list, device) -> dict[str, torch.Tensor]:
        """Units behind each term over the whole accumulated batch (and all processes), for exact normalisation."""
        totals: dict[str, torch.Tensor] = {}
        for batch in batch_samples:
            for name, count in unit_counts(unit_masks(batch, self._kind), batch_size(batch)).items():
                count = count.to(device)  # summed where the masks are: reading them on the host would sync
                totals[name] = totals[name] + count if name in totals else count
        names = sorted(totals)
        vector = torch.stack([totals[n] for n in names])
        if self.args.world_size > 1:
            vector = self.accelerator.gather(vector.unsqueeze(0)).sum(0)
        return dict(zip(names, vector, strict=True))

    @property
    def _accumulation_steps(self) -> int:
        # Set by Trainer's training loop; a compute_loss called outside train() sees one micro-batch per step.
        return getattr(self, "current_gradient_accumulation_steps", 1)

    def _feature_flags(self) -> dict[str, bool]:
        """The `output_*` flags the terms need (the teacher's call leaves out those its forward does not take)."""
        return dict(self.term_set.flags())

    def _student_flags(self) -> dict[str, bool]:
        # A plain nn.Module student (forward(pixel_values) -> logits) takes no output flags; the terms then read its
        # submodules, and one that needs its hidden states says so in its own error.
        if self._student_takes is None:
            self._student_takes = forward_keywords(unwrap_peft(self.accelerator.unwrap_model(self.model)))
        names, takes_kwargs = self._student_takes
        flags = self._feature_flags()
        return flags if takes_kwargs else {k: v for k, v in flags.items() if k in names}

    def _split_inputs(self, inputs: dict) -> tuple[dict, dict, dict]:
        """Student inputs, teacher inputs (no labels; `teacher_*` keys renamed), and the full batch for masks."""
        inputs = dict(inputs)
        student = student_inputs(inputs)
        derived = {}
        if self._kind.encoder_decoder and "labels" in student and "decoder_input_ids" not in student:
            # Both models must decode the same sequence; derive it once from the labels as the models would.
            prepare = getattr(
                unwrap_peft(self.accelerator.unwrap_model(self.model)), "prepare_decoder_input_ids_from_labels", None
            )
            if prepare is not None:
                derived["decoder_input_ids"] = student["decoder_input_ids"] = prepare(labels=student["labels"])
        teacher = teacher_inputs({**inputs, **derived})
        return student, teacher, inputs

    def _teacher_outputs(self, batch: dict, teacher_inputs: dict, **extra) -> dict | None:
        """{teacher name: its outputs}: the cached outputs when the batch carries them, else each teacher's forward;
        None without either."""
        if self.peers:  # the probe; training runs the peers with gradients (_peer_forwards)
            return {name: call_model(peer, teacher_inputs) for name, peer in self.peers.items()}
        if self._caches and has_cached_outputs(batch):
            if self._cache is not None:
                return {"teacher": CachedTeacherOutput(batch, self._cache)}
            return {n: CachedTeacherOutput(batch, c, cached_prefix(n)) for n, c in self._caches.items()}
        if not self.teachers:
            return None
        return {name: self._teacher_forward(teacher_inputs, name, **extra) for name in self.teachers}

    def _teacher_forward(self, teacher_inputs: dict, name: str, **extra):
        kwargs = {**self._feature_flags(), **extra}
        if self._teacher_accepts_use_cache[name]:
            kwargs["use_cache"] = False  # a KV cache is dead weight in a single forward
        with torch.no_grad():
            return call_model(self.teachers[name], teacher_inputs, kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training and (self._predicting or not self.args.eval_with_teacher):
            return self._student_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._distills and not self._probed:
            self._probe(inputs)
        with self._capture("student") as s_modules, self._capture_teachers() as t_modules:
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch, s_modules, t_modules)

    def _student_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """Evaluation of the student alone (predict(), or eval_with_teacher=False): its own loss, no teacher."""
        student_inputs, _, _ = self._split_inputs(inputs)
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

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch, s_modules, t_modules):
        args = self.args
        training = model.training
        student_inputs, teacher_inputs, batch = self._split_inputs(inputs)
        flags = self._student_flags()
        terms: dict[str, torch.Tensor] = {}
        fused = None  # the head term and the task loss by chunks, already weighted (see _head_loss)
        cached = bool(self._caches) and has_cached_outputs(batch)
        if training and self._distills and self.teacher_model is None and not cached and not self.peers:
            raise TeacherCacheError("A training batch came without cached teacher outputs and there is no teacher.")
        distills = self._distills and (cached or self.teacher_model is not None or bool(self.peers))
        chunked = (
            distills
            and self._chunk_heads is not None
            and (cached or self._chunk_heads[2] is not None)
            and (training or args.prediction_loss_only)  # evaluation that returns logits needs them whole
            and "shift_labels" not in student_inputs
        )

        peer_loss = None
        if self.peers and distills:  # deep mutual learning: the peers train too, and teach the student detached
            peer_outs, peer_tasks = self._peer_forwards(student_inputs, num_items_in_batch, training)
            teacher_outs = {name: detached(out) for name, out in peer_outs.items()}
        elif distills:
            # The teachers run first: their forwards then find the allocator and caches as a forward alone would,
            # not behind the student's activations (measured: each teacher forward ~20% slower after the student's).
            online_chunks = chunked and not cached
            with capture_last_hidden(self._chunk_heads[2] if online_chunks else None) as t_last:
                teacher_outs = self._teacher_outputs(
                    batch, teacher_inputs, **({"logits_to_keep": 1} if online_chunks else {})
                )
            teacher_out = next(iter(teacher_outs.values()))  # the chunked path has one teacher
        if chunked:
            plain = {k: v for k, v in student_inputs.items() if k != "labels"}
            with capture_last_hidden(self._chunk_heads[0]) as s_last:
                outputs = model(**plain, **flags, logits_to_keep=1)
        elif args.task_weight > 0:
            terms["task"], outputs = self._task_loss(model, {**student_inputs, **flags}, num_items_in_batch, training)
        else:
            plain = {k: v for k, v in student_inputs.items() if k != "labels"}
            outputs = model(**plain, **flags)

        if distills:
            masks = unit_masks(batch, self._kind)
            counts, scale = self._normalisers(masks, batch, training)
            head = None
            if chunked:
                head, _ = self.term_set.head_term()
                fused, logged = self._head_loss(
                    s_last.value,
                    teacher_out if cached else t_last.value,
                    student_inputs.get("labels"),
                    masks["logit"],
                    counts,
                    scale,
                    num_items_in_batch,
                    training,
                )
                terms.update(logged)
            student_side = Features(outputs, s_modules, self._kind)
            teacher_sides = {name: Features(out, t_modules[name], self._kind) for name, out in teacher_outs.items()}
            mixed, teacher_weights = self._combined_teacher(teacher_sides, batch)
            term_batch = self._term_batch(batch, training, masks, counts)
            terms.update(
                self._term_values(
                    student_side, teacher_sides, term_batch, scale, training, head, mixed, teacher_weights
                )
            )
            if self.peers:
                peer_loss, logged = self._peer_values(
                    outputs, peer_outs, peer_tasks, batch, term_batch, scale, training
                )
                terms.update(logged)

        weights = {"task": args.task_weight, **{f"distill/{name}": w for name, w in self.term_set.weights.items()}}
        fused_names = ("task", f"distill/{head}") if fused is not None else ()
        loss = fused
        for name, value in terms.items():
            if name in fused_names or name not in weights:
                continue  # inside `fused` already, or one teacher's share, logged only
            weighted = value if weights[name] == 1 else weights[name] * value
            loss = weighted if loss is None else loss + weighted
        if peer_loss is not None:
            loss = peer_loss if loss is None else loss + peer_loss
        if loss is None:  # evaluation with neither task loss nor teacher: nothing to report but zero
            loss = torch.zeros((), device=self.args.device)
        if training:
            self._stop_if_not_finite(terms)
        self._record(terms, "train" if training else "eval")

        if not return_outputs:
            return loss
        if flags:
            # Evaluation gathers every tensor output as a prediction; drop the features requested for the loss.
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in _OUTPUT_FEATURE_KEYS})
        return loss, outputs

    def _task_loss(self, model, inputs: dict, num_items_in_batch, training: bool, peer: str | None = None):
        """A model's own loss on the labels by Trainer's path (so that task-only training is exactly Trainer's, label
        smoothing and compute_loss_func included), scaled like the terms: over the accumulation window.

        `peer`: a peer's name; Trainer.compute_loss reads `model_accepts_loss_kwargs` for the model it is given, so
        it is the peer's own during its call."""
        if peer is None:
            accepts, uses_num_items = self.model_accepts_loss_kwargs, self._task_uses_num_items
        else:
            accepts, uses_num_items = self._peer_loss_kwargs[peer]
        own = self.model_accepts_loss_kwargs
        self.model_accepts_loss_kwargs = accepts
        try:
            task_loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        finally:
            self.model_accepts_loss_kwargs = own
        scaled_by_trainer = (accepts and num_items_in_batch is not None) or self.compute_loss_func is not None
        if scaled_by_trainer and self.compute_loss_func is None and not uses_num_items:
            # A per-batch mean that Trainer took for a sum over the accumulated count: undo its scaling.
            if self.args.average_tokens_across_devices:
                task_loss = task_loss / (self.accelerator.num_processes // self.get_tp_size())
            scaled_by_trainer = False
        if training and not scaled_by_trainer:
            task_loss = task_loss / self._accumulation_steps
        return task_loss, outputs

    def _peer_forwards(self, inputs: dict, num_items_in_batch, training: bool):
        """Each peer's forward, with gradients: ({name: outputs}, {name: its own task loss, when weighted})."""
        outs, tasks = {}, {}
        for name, peer in self._peers_wrapped.items():
            self.peers[name].train(training)  # Trainer sets the student's mode each step; the peers follow it
            if self.args.task_weight > 0 and "labels" in inputs:
                tasks[name], outs[name] = self._task_loss(peer, dict(inputs), num_items_in_batch, training, name)
            else:
                outs[name] = call_model(peer, {k: v for k, v in inputs.items() if k != "labels"})
        return outs, tasks

    def _peer_values(self, student_out, peer_outs: dict, peer_tasks: dict, batch, term_batch, scale, training):
        """Each peer's loss (task + its terms against the student and the other peers, all detached) summed, and
        what is logged: `<peer>/task`, `<peer>/distill/<term>` (and per other model with more than one)."""
        sides = {"student": Features(detached(student_out), {}, self._kind)}
        sides.update({name: Features(detached(out), {}, self._kind) for name, out in peer_outs.items()})
        loss, logged = None, {}
        for name, terms in self._peer_terms.items():
            others = {other: sides[other] for other in terms.teachers}
            mixed, teacher_weights = self._combined_teacher(others, batch, terms)
            own = Features(peer_outs[name], {}, self._kind)
            values = self._term_values(
                own, others, term_batch, scale, training, mixed=mixed, teacher_weights=teacher_weights, term_set=terms
            )
            if name in peer_tasks:
                values = {"task": peer_tasks[name], **values}
            weights = {"task": self.args.task_weight, **{f"distill/{t}": w for t, w in terms.weights.items()}}
            for key, value in values.items():
                logged[f"{name}/{key}"] = value
                if key in weights:  # not one other model's share, logged only
                    weighted = value if weights[key] == 1 else weights[key] * value
                    loss = weighted if loss is None else loss + weighted
        return loss, logged

    def _head_loss(self, s_hidden, teacher, labels, mask, counts, scale, num_items_in_batch, training):
        """The head term (`TermSet.head_term`) and, if weighted, the student's own next-token loss, by chunks.

        Returns the weighted sum (with gradients) and each one's value for the logs. Both are normalised exactly as
        on the full-logits path: the term over the window's counted positions, the task loss as Trainer and the
        model's loss function do it (sum over `num_items_in_batch`, else a mean per batch divided by the
        accumulation steps).
        """
        args = self.args
        name, term = self.term_set.head_term()
        s_head, t_head = self._chunk_heads[1], self._chunk_heads[3]
        task_coef = None
        if args.task_weight > 0 and isinstance(labels, torch.Tensor):  # evaluation may come without labels
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                task_coef = 1.0 / num_items_in_batch
                if args.average_tokens_across_devices:
                    task_coef = task_coef * (self.accelerator.num_processes // self.get_tp_size())
            else:
                task_coef = 1.0 / labels[:, 1:].ne(-100).sum().clamp_min(1)  # a tensor: no host sync
                if training:
                    task_coef = task_coef / self._accumulation_steps
        per_unit = scale / counts["logit"]
        fused, term_sum, task_sum = term.head_loss(
            s_hidden,
            s_head,
            teacher,
            t_head,
            mask,
            self.term_set.weights[name] * per_unit,
            labels=labels,
            task_scale=args.task_weight * task_coef if task_coef is not None else None,
        )
        logged = {"task": task_sum * task_coef} if task_coef is not None else {}
        logged[f"distill/{name}"] = term_sum * per_unit
        return fused, logged

    def _stop_if_not_finite(self, terms: dict[str, torch.Tensor]) -> None:
        # One host sync per step (Trainer's logging_nan_inf_filter already makes one); raising here, before
        # backward, keeps the bad update out of the weights and the last checkpoint good.
        values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
        if bool(torch.isfinite(values).all()):
            return
        shown = ", ".join(f"{name}={value:.4g}" for name, value in zip(terms, values.tolist(), strict=True))
        bad = [
            name for name, value in zip(terms, values.tolist(), strict=True) if not torch.isfinite(torch.tensor(value))
        ]
        last, _ = last_complete_checkpoint(self.args.output_dir)
        raise NonFiniteLossError(
            f"Non-finite loss at step {self.state.global_step + 1}: {', '.join(bad)} went bad ({shown}). Training "
            f"stopped before this update; the last good checkpoint is {last or 'none (none saved yet)'}. Lower "
            "learning_rate, check this batch's inputs and labels, or (fp16) use bf16 or a higher temperature."
        )

    def _normalisers(self, masks: dict, batch: dict, training: bool) -> tuple[dict[str, torch.Tensor], float]:
        """Counts to divide each term's sum by, and the factor that undoes DDP's averaging over processes."""
        if training and self._window_counts is not None:
            counts, scale = self._window_counts, float(self.args.world_size)
        else:
            counts, scale = unit_counts(masks, batch_size(batch)), 1.0
        # An all-masked batch gives 0 / 1 = 0 rather than 0 / 0 = NaN.
        return {k: v.clamp_min(1.0) for k, v in counts.items()}, scale

    # ------------------------------------------------------------------ logging
    def _record(self, terms: dict[str, torch.Tensor], mode: str) -> None:
        sums = self._metric_sums[mode]
        for name, value in terms.items():
            value = value.detach().float()
            sums[name] = sums[name] + value if name in sums else value
        if mode == "eval":
            self._eval_batches += 1

    def _flush(self, mode: str, divisor: float) -> dict[str, float]:
        sums = self._metric_sums[mode]
        if not sums or divisor <= 0:
            return {}
        names = list(sums)
        vector = torch.stack([sums[n] for n in names])
        if self.args.world_size > 1:
            vector = self.accelerator.reduce(vector, reduction="mean")
        values = (vector / divisor).tolist()  # the one host sync per log
        self._metric_sums[mode] = {}
        return dict(zip(names, values, strict=True))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add each term's mean over the steps since the last one
            logs = {**logs, **self._flush("train", self._train_windows)}
            self._train_windows = 0
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._metric_sums["eval"], self._eval_batches = {}, 0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # Each term's mean over the evaluation batches, returned by evaluate() and logged with its metrics.
        terms = self._flush("eval", self._eval_batches)
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in terms.items()})
        return output


_ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "dropout_rate")


def _warn_attention_dropout(model: torch.nn.Module) -> None:
    # Eager attention returns its maps *after* dropout, so in training the student's maps carry zeros and rescaled
    # entries that the teacher's lack; the attention term then measures dropout noise as much as disagreement.
    config = getattr(model, "config", None)
    for name in _ATTENTION_DROPOUT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and value > 0:
            logger.warning(
                "A term reads attention maps and the student has %s=%s: its attention maps are taken after dropout "
                "in training, which inflates such terms. Build the student with %s=0 for clean maps.",
                name,
                value,
                name,
            )
            return


def _check_text_column(dataset, which: str, args: DistillationConfig, causal_lm: bool) -> None:
    """Text rows that TwoTokenizerCollator will tokenize for both models need their text column; checked against the
    dataset's own columns before Trainer drops the ones the student's forward does not take."""
    if isinstance(dataset, dict):
        for name, one in dataset.items():
            _check_text_column(one, f"{which}[{name!r}]", args, causal_lm)
        return
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or TEACHER_PREFIX + "input_ids" in columns:
        return  # not a datasets.Dataset, or rows already tokenized for both (tokenize_for_both)
    if causal_lm and (("prompt" in columns and "completion" in columns) or "messages" in columns):
        return  # prompt-completion rows; conversations are refused by the collator, with what to do
    wanted = [c for c in (args.tokenize_text_column, args.tokenize_text_pair_column) if c and c not in columns]
    if wanted:
        field_names = ["tokenize_text_column"] if args.tokenize_text_column in wanted else []
        field_names += ["tokenize_text_pair_column"] if args.tokenize_text_pair_column in wanted else []
        raise ValueError(
            f"{which} has no {' or '.join(map(repr, wanted))} column to tokenize for both models (teacher_processing_"
            f"class); its columns are {columns}. Set {' and '.join(field_names)} to the column that holds the text"
            + (", or give `prompt` and `completion` texts." if causal_lm else ".")
        )


def _read_run_file(directory: str) -> dict | None:
    path = os.path.join(directory, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _write_run_file(directory: str, fingerprint: dict) -> None:
    path = os.path.join(directory, RUN_FILE)
    with open(path + ".tmp", "w") as handle:  # renamed into place: the file is there whole or not at all
        json.dump(fingerprint, handle, indent=1)
    os.replace(path + ".tmp", path)


def _describe(fingerprint: dict | None) -> str:
    if not fingerprint:
        return "unknown models"
    teacher, student = fingerprint.get("teacher", {}), fingerprint.get("student", {})
    if "peers" in fingerprint:
        return f"peers {sorted(fingerprint['peers'])}, student {student.get('class', '?')}"
    if "teachers" in fingerprint:
        return f"teachers {sorted(fingerprint['teachers'])}, student {student.get('class', '?')}"
    name = teacher.get("name_or_path") or teacher.get("class", "?")
    return f"teacher {name} [{teacher.get('config_sha256', '?')}], student {student.get('class', '?')} [{student.get('config_sha256', '?')}]"


def _accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    """Whether Trainer would pass `num_items_in_batch` to this model's forward (its own rule, for a peer)."""
    declared = getattr(model, "accepts_loss_kwargs", None)
    if declared is not None:
        return bool(declared)
    return forward_keywords(model)[1]


def _get(outputs, key: str):
    if isinstance(outputs, dict):
        return outputs.get(key)
    return getattr(outputs, key, None)


def _named_caches(value, teachers: list[str]) -> dict[str, str]:
    """`teacher_cache_dir` as {teacher name: folder}: one folder for one teacher; a list in teacher order or a dict by
    teacher name for several (one cache per teacher, each built by `hfkd cache` for that teacher)."""
    if isinstance(value, str):
        if len(teachers) > 1:
            raise ValueError(
                f"teacher_cache_dir is one folder, but there are {len(teachers)} teachers ({teachers}) and a cache holds "
                "one teacher's outputs: give one cache per teacher, as a list in teacher order or a dict by name."
            )
        return {teachers[0] if teachers else "teacher": value}
    caches = named_teachers(value)  # names a list teacher0, teacher1, ... like the teachers; refuses repeats
    if teachers and isinstance(value, (list, tuple)):
        if len(value) != len(teachers):
            raise ValueError(
                f"teacher_cache_dir lists {len(value)} caches for {len(teachers)} teachers ({teachers}); give one per "
                "teacher, in the same order."
            )
        caches = dict(zip(teachers, value, strict=True))
    if teachers and set(caches) != set(teachers):
        missing = sorted(set(teachers) - set(caches))
        raise ValueError(
            f"teacher_cache_dir has caches for {sorted(caches)}, but the teachers are {teachers}"
            f"{f' (no cache for {missing})' if missing else ''}; give one cache per teacher, by name."
        )
    return caches
