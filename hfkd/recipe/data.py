"""The recipe's data: its splits, the tokenizers (or image processor) of teacher and student, the data as each
stage reads it, and the batches (collators) of each role."""

import os
from dataclasses import dataclass

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    default_data_collator,
)

from .. import data as hfkd_data
from ..augment import TEXT_OPS, TextCollator, parse_augment
from ..batch import SPANS, TEACHER_PREFIX, TEACHER_SPANS
from ..config import DistillationConfig
from ..cross_modal import CrossModalCollator, modality
from ..data import DataArguments
from ..paths import resolve_path
from ..two_tokenizers import TwoTokenizerCollator
from .arguments import RecipeArguments, json_arg
from .models import TeacherLocation
from .preflight import check_across, check_labelled_rows, check_one_tokenizer, check_student_audio


@dataclass
class RecipeData:
    """The data every stage reads, tokenized once: by the teacher's tokenizer, the student's, or both."""

    processor: object
    """The teacher's tokenizer, or the image processor of image tasks."""
    student_processor: object
    """The student's own tokenizer when it differs from the teacher's, its feature extractor when it reads audio
    (`cross_modal`), else `processor` itself."""
    across: bool
    """Whether the student has its own tokenizer (distillation reads the text tokenized for both)."""
    labels: list[str] | None
    """Class names in label-id order (the teacher's own order when it is not fine-tuned); None for causal LMs."""
    train_ds: datasets.Dataset | None
    """The labelled training rows in the teacher's tokenization (teacher fine-tuning); None across tokenizers unless
    the teacher is fine-tuned."""
    eval_ds: datasets.Dataset | None
    """Held-out rows in the teacher's tokenization (its evaluation); None for causal LMs across tokenizers."""
    student_train_ds: datasets.Dataset
    """Training rows, transfer rows included, as the student alone reads them (born-again generations)."""
    student_eval_ds: datasets.Dataset
    """Held-out rows as the student alone reads them (evaluation of every model but the teacher)."""
    distill_train_ds: datasets.Dataset
    """Training rows of distillation, transfer rows (labels -100) last: both tokenizations across tokenizers, else
    `student_train_ds` (what hfkd cache runs the teacher over)."""
    distill_eval_ds: datasets.Dataset
    """Held-out rows of evaluation during distillation."""
    lm_texts: list[str] | None = None
    """Causal LMs: the held-out text in pieces every tokenizer holds in max_length tokens (bits per byte); else
    None."""
    dropped_rows: str | None = None
    """Classifiers: what was said of training and held-out rows without a label (None when there were none)."""
    unseen_eval_rows: str | None = None
    """Classifiers: what was said of held-out rows with a label the training split lacks (None when none)."""
    labelled_train_ds: datasets.Dataset | None = None
    """The labelled training rows as the student alone reads them (the labels-only comparison); None: all of
    `student_train_ds`."""
    transfer_rows: int = 0
    """How many training rows of distillation are transfer rows (no label: distillation terms alone)."""
    transfer_note: str | None = None
    """The labelled and transfer rows in words, with where the transfer rows came from (None without any)."""

    cross_modal: bool = False
    """Whether the student reads another modality than the teacher (student_modality, hfkd.cross_modal): distillation
    reads rows of both (the teacher's text, the student's audio) through CrossModalCollator; `student_*_ds` hold the
    student's features."""

    text_views: bool = False
    """Word augmentations (`augment`, hfkd.augment): `distill_train_ds` keeps its text, which the distillation
    collator tokenizes again after each batch is augmented."""

    @property
    def labelled_rows(self) -> datasets.Dataset:
        """The labelled training rows as the student reads them."""
        return self.student_train_ds if self.labelled_train_ds is None else self.labelled_train_ds


def load_data(
    recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig, source: TeacherLocation
) -> RecipeData:
    """The splits, the tokenizers and the data as each stage reads it; what cannot run with the student's tokenizer
    is refused before anything is tokenized."""
    task = recipe.task
    train_raw, eval_raw = hfkd_data.load_splits(data_args, config.seed)
    labels = dropped_rows = unseen_eval_rows = None
    rows = hfkd_data.TrainingRows([train_raw], [])
    if task != "causal-lm":
        unlabelled = None
        if data_args.keep_unlabelled_rows:
            train_raw, unlabelled = hfkd_data.split_unlabelled(train_raw, data_args)
        train_raw, eval_raw, dropped_rows = hfkd_data.drop_unlabelled(train_raw, eval_raw, data_args)
        names = hfkd_data.label_names(train_raw, eval_raw, data_args)
        eval_raw, unseen_eval_rows = hfkd_data.drop_unseen_eval_labels(eval_raw, names, data_args)
        inputs = (
            {"image_column": data_args.image_column}
            if task == "image-classification"
            else {"text_column": data_args.text_column, "text_pair_column": data_args.text_pair_column}
        )
        if recipe.student_modality == "audio":  # transfer rows need the student's audio too
            inputs["audio_column"] = data_args.audio_column
        rows = hfkd_data.training_rows(train_raw, names, data_args, config.seed, inputs, unlabelled)
        check_labelled_rows(recipe, data_args, rows.labelled_count, rows.transfer_count)
        labels = _teacher_label_order(recipe, config, source, data_args, names)
    processor = _teacher_processor(recipe, source)
    cross_modal = recipe.student_modality is not None
    student_processor = _student_processor(recipe) if cross_modal else _student_tokenizer(recipe, processor)
    across = student_processor is not processor and not cross_modal
    text_views = task == "text-classification" and any(op in TEXT_OPS for op in parse_augment(config.augment))
    if cross_modal:
        check_student_audio(data_args, student_processor)
        splits = _cross_modal_splits(recipe, data_args, processor, student_processor, labels, rows, eval_raw)
    elif across:
        check_across(recipe, config, student_processor, processor)
        splits = _tokenize_across(recipe, data_args, processor, student_processor, labels, rows, eval_raw, text_views)
    else:
        check_one_tokenizer(config)
        train_ds, full_ds = _preprocess_rows(
            rows, lambda d, unlabelled: _preprocess(task, data_args, processor, labels, d, unlabelled, text_views)
        )
        eval_ds = _preprocess(task, data_args, processor, labels, eval_raw)
        # One tokenization serves every stage; with word augmentations the text stays for the distillation only.
        splits = dict(
            train_ds=_without_text(train_ds, data_args),
            eval_ds=eval_ds,
            student_train_ds=_without_text(full_ds, data_args),
            student_eval_ds=eval_ds,
            distill_train_ds=full_ds,
            distill_eval_ds=eval_ds,
            labelled_train_ds=_without_text(train_ds, data_args) if full_ds is not train_ds else None,
        )
    lm_texts = None
    if task == "causal-lm":
        # The texts every model's bits per byte is measured on: the held-out text cut at whitespace into pieces
        # each tokenizer holds in max_length tokens (the held-out rows of a run across tokenizers).
        tokenizers = [processor] + ([student_processor] if across else [])
        texts = [t for t in eval_raw[data_args.text_column] if t]
        lm_texts = hfkd_data.split_text(texts, tokenizers, data_args.max_length)
    return RecipeData(
        processor=processor,
        student_processor=student_processor,
        across=across,
        cross_modal=cross_modal,
        labels=labels,
        lm_texts=lm_texts,
        dropped_rows=dropped_rows,
        unseen_eval_rows=unseen_eval_rows,
        transfer_rows=rows.transfer_count,
        transfer_note=rows.note(),
        text_views=text_views,
        **splits,
    )


def _preprocess_rows(rows, prep) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The labelled rows and all training rows (transfer rows last), each part preprocessed by `prep(part,
    unlabelled)`. Without transfer rows both are the one preprocessed training set, as before transfer rows."""
    labelled = [prep(d, False) for d in rows.labelled if len(d)]
    transfer = [prep(d, True) for d in rows.transfer if len(d)]
    full = _concatenate(labelled + transfer)
    if not transfer:
        return full, full
    return (_concatenate(labelled) if labelled else full.select([])), full


def _concatenate(parts: list) -> datasets.Dataset:
    """Preprocessed parts as one data set: class ids as plain ints (transfer rows hold -100), the format kept."""
    if len(parts) == 1:
        return parts[0]
    kind = parts[0].format["type"]
    parts = [
        p.cast_column("labels", datasets.Value("int64"))
        if isinstance(p.features.get("labels"), datasets.ClassLabel)
        else p
        for p in parts
    ]
    joined = datasets.concatenate_datasets([p.with_format(None) for p in parts])
    return joined.with_format(kind) if kind else joined


def _teacher_processor(recipe: RecipeArguments, source: TeacherLocation):
    """The teacher's tokenizer (its EOS token pads when it has no pad token), or the image processor."""
    if recipe.task == "image-classification":
        return _image_processor(recipe, source)
    if source.path is None:
        raise ValueError(f"task={recipe.task} needs teacher_model_name_or_path for its tokenizer.")
    processor = AutoTokenizer.from_pretrained(source.path, **source.gguf_kwargs())
    if processor.pad_token is None:
        processor.pad_token = processor.eos_token
    return processor


def _student_tokenizer(recipe: RecipeArguments, processor):
    """The student's own tokenizer when it has one that differs from the teacher's, else the teacher's."""
    r = recipe
    if not r.student_model_name_or_path or r.task == "image-classification":
        return processor
    path = resolve_path(r.student_model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    if tokenizer is None:
        _check_reads_teacher_ids(recipe, path, processor)
        return processor
    if tokenizer.get_vocab() == processor.get_vocab():
        return processor  # the teacher's tokenizer: the run is the same as with a student built from it
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"student_model_name_or_path={r.student_model_name_or_path!r}: its tokenizer "
            f"({type(tokenizer).__name__}) differs from the teacher's and is not a fast tokenizer, but lining up "
            "two tokenizations needs each token's character offsets. Save a fast tokenizer (tokenizer.json) with "
            "the student."
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"student_model_name_or_path={r.student_model_name_or_path!r}: its tokenizer has neither a pad "
                "nor an EOS token to pad batches with; set tokenizer.pad_token and save it with the student."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _student_processor(recipe: RecipeArguments):
    """The processor of a student that reads another modality (student_processor, else the one saved beside
    student_model_name_or_path); it must read that modality."""
    value = recipe.student_processor
    named = (
        f"student_processor={value!r}"
        if value
        else f"student_model_name_or_path={recipe.student_model_name_or_path!r}"
    )
    try:
        if value and value.lstrip().startswith("{"):
            spec = json_arg(value, "student_processor")
            name = spec.pop("feature_extractor_type")
            cls = getattr(transformers, name, None)
            if cls is None:
                raise ValueError(f"transformers has no class {name!r}")
            processor = cls(**spec)
        else:
            processor = AutoFeatureExtractor.from_pretrained(resolve_path(value or recipe.student_model_name_or_path))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"{named}: could not build the student's {recipe.student_modality} processor ({err}). Give "
            "student_processor a folder holding the student's feature extractor (preprocessor_config.json), or a "
            "JSON object of its arguments with 'feature_extractor_type'."
        ) from None
    try:
        reads = modality(processor)
    except ValueError:
        reads = type(processor).__name__
    if reads != recipe.student_modality:
        raise ValueError(
            f"{named} gives a {reads} processor ({type(processor).__name__}), but student_modality="
            f"{recipe.student_modality!r}: give student_processor the student's own feature extractor."
        )
    return processor


def _cross_modal_splits(recipe, data_args, processor, student_processor, labels, rows, eval_raw) -> dict:
    """Distillation reads rows of both modalities (CrossModalCollator); the teacher's stages its tokenization of the
    text; the student's own stages (the labels-only comparison, evaluation) its features of the audio."""
    task = recipe.task

    def paired(d, unlabelled=False):
        return hfkd_data.paired_rows(d, data_args, labels, unlabelled)

    labelled_pairs, train_pairs = _preprocess_rows(rows, paired)
    eval_pairs = paired(eval_raw)
    heard = hfkd_data.preprocess_audio(train_pairs, student_processor, data_args)
    train_ds = (
        _concatenate([_preprocess(task, data_args, processor, labels, d) for d in rows.labelled if len(d)])
        if recipe.finetune_teacher
        else None
    )
    return dict(
        train_ds=train_ds,
        eval_ds=_preprocess(task, data_args, processor, labels, eval_raw),  # the teacher's evaluation
        student_train_ds=heard,
        student_eval_ds=hfkd_data.preprocess_audio(eval_pairs, student_processor, data_args),
        distill_train_ds=train_pairs,
        distill_eval_ds=eval_pairs,
        # The labelled rows come first (_preprocess_rows): the labels-only comparison's rows.
        labelled_train_ds=None if labelled_pairs is train_pairs else heard.select(range(len(labelled_pairs))),
    )


def _check_reads_teacher_ids(recipe: RecipeArguments, path: str, processor) -> None:
    """No tokenizer beside the student: it must read the teacher's ids, as students built from the teacher do."""
    name = recipe.student_model_name_or_path
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load the student {name!r} (student_model_name_or_path): {err}\n"
            "Check the id or path (HF_HUB_OFFLINE=1 allows only local or cached models)."
        ) from err
    vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and vocab < len(processor):
        raise ValueError(
            f"student_model_name_or_path={name!r} has no tokenizer, and its vocabulary "
            f"({vocab} tokens) is smaller than the teacher's tokenizer ({len(processor)}): it cannot read "
            "the teacher's ids. Save the student's own tokenizer in its folder (tokenizer.save_pretrained("
            "folder)); hfkd then tokenizes the text for both models."
        )


def _tokenize_across(
    recipe, data_args, processor, student_processor, labels, rows, eval_raw, text_views: bool = False
) -> dict:
    """Teacher stages keep the teacher's tokenization; distillation reads both (the student's view is its part)."""
    task = recipe.task
    if task == "text-classification":

        def both(d, unlabelled=False, keep_text=text_views):
            return hfkd_data.preprocess_text_classification_for_both(
                d, student_processor, processor, data_args, labels, unlabelled, keep_text
            )

        eval_ds = _preprocess(task, data_args, processor, labels, eval_raw)  # the teacher's evaluation
    else:

        def both(d, unlabelled=False, keep_text=False):
            return hfkd_data.preprocess_causal_lm_for_both(d, student_processor, processor, data_args)

        eval_ds = None  # every causal LM is evaluated on the same held-out text, in bits per byte
    labelled_both, train_both = _preprocess_rows(rows, both)
    eval_both = both(eval_raw, keep_text=False)
    # The teacher's own tokenization of the labelled training rows serves its fine-tuning only.
    train_ds = (
        _concatenate([_preprocess(task, data_args, processor, labels, d) for d in rows.labelled if len(d)])
        if recipe.finetune_teacher
        else None
    )

    def student_view(d):
        return d.remove_columns(
            [
                c
                for c in d.column_names
                if c.startswith(TEACHER_PREFIX) or c in (SPANS, TEACHER_SPANS) or c in _text_columns(data_args)
            ]
        )

    return dict(
        train_ds=train_ds,
        eval_ds=eval_ds,
        student_train_ds=student_view(train_both),
        student_eval_ds=student_view(eval_both),
        distill_train_ds=train_both,
        distill_eval_ds=eval_both,
        labelled_train_ds=None if labelled_both is train_both else student_view(labelled_both),
    )


def _teacher_label_order(
    recipe: RecipeArguments, config: DistillationConfig, source: TeacherLocation, data_args: DataArguments, labels
) -> list[str]:
    """A teacher that is not fine-tuned here keeps its own label ids; the data must be encoded the same way."""
    if recipe.finetune_teacher or recipe.teacher_config or not source.path:
        return labels
    teacher_config = AutoConfig.from_pretrained(source.path, **source.gguf_kwargs())
    names = (
        [str(teacher_config.id2label[i]) for i in range(teacher_config.num_labels)] if teacher_config.id2label else []
    )
    if sorted(names) == sorted(labels):
        return names
    raise ValueError(
        f"The teacher {config.teacher_model_name_or_path!r} predicts {names} but the data's "
        f"{data_args.label_column!r} column holds {labels}. Give a teacher trained on these labels, or set "
        "finetune_teacher=true to fine-tune it (with a new head) first."
    )


def _image_processor(recipe: RecipeArguments, source: TeacherLocation):
    path = source.path
    if path and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        return AutoImageProcessor.from_pretrained(path)
    if path and not os.path.isdir(path) and not recipe.teacher_config:
        return AutoImageProcessor.from_pretrained(path)
    processor_cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    return processor_cls(**json_arg(recipe.image_processor_kwargs, "image_processor_kwargs"))


def _text_columns(data_args: DataArguments) -> list[str]:
    return [c for c in (data_args.text_column, data_args.text_pair_column) if c]


def _without_text(dataset, data_args: DataArguments):
    """`dataset` less its raw text columns (kept for word augmentations by the distillation's rows only)."""
    if dataset is None:
        return None
    text = [c for c in _text_columns(data_args) if c in dataset.column_names]
    return dataset.remove_columns(text) if text else dataset


def _preprocess(
    task: str, data_args: DataArguments, processor, labels, dataset, unlabelled: bool = False, keep_text: bool = False
):
    if task == "text-classification":
        return hfkd_data.preprocess_text_classification(dataset, processor, data_args, labels, unlabelled, keep_text)
    if task == "image-classification":
        return hfkd_data.preprocess_image_classification(dataset, processor, data_args, labels, unlabelled)
    return hfkd_data.preprocess_causal_lm(dataset, processor, data_args)


def collator(data: RecipeData, task: str, data_args: DataArguments, role: str = "student"):
    """Batches for `role`: 'teacher' (its own tokenization), 'student', or 'distill' (both, when they differ)."""
    if role == "distill" and data.cross_modal:
        return CrossModalCollator(
            data.student_processor,
            data.processor,
            student_columns=data_args.audio_column,
            teacher_columns=_text_columns(data_args),
            sampling_rate=data_args.audio_sampling_rate,
            max_length=data_args.max_length,
        )
    if role == "distill" and data.across:
        return TwoTokenizerCollator(
            data.student_processor,
            data.processor,
            max_length=data_args.max_length,
            text_column=data_args.text_column,
            text_pair_column=data_args.text_pair_column,
            causal_lm=task == "causal-lm",
        )
    tokenizer = data.processor if role == "teacher" else data.student_processor
    if role == "distill" and data.text_views:  # rows keep their text: tokenized after each batch is augmented
        return TextCollator(tokenizer, data_args.text_column, data_args.text_pair_column, data_args.max_length)
    if task == "text-classification":
        return DataCollatorWithPadding(tokenizer)
    if task == "causal-lm":
        if data.across and role != "teacher":  # rows of text pieces, their labels already made
            return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return default_data_collator


def data_note(data: RecipeData, recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig) -> str:
    """The data in a sentence, for the card and the teacher's record: its source, sizes and what was dropped."""
    return (
        f"`{data_args.dataset_name}`"
        + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
        + (f" from {data_args.data_files}" if data_args.data_files else "")
        + f"; {len(data.distill_train_ds)} training and {len(data.student_eval_ds)} held-out examples"
        + (
            f" (pieces of text of at most {data_args.max_length} tokens for both tokenizers, not packed)"
            if data.across and recipe.task == "causal-lm"
            else ""
        )
        + (
            ""
            if data_args.eval_split
            else f" (held-out {data_args.eval_fraction:.0%} carved from train, seed {config.seed})"
        )
        + (f"; {data.transfer_note}" if data.transfer_note else "")
        + (f"; {data.dropped_rows}" if data.dropped_rows else "")
        + (f"; {data.unseen_eval_rows}" if data.unseen_eval_rows else "")
    )
