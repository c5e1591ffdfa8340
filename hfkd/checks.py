"""Checks that run before the first training step: pure functions over models' configs, batches and data sets.

None of them runs a model. Each raises a `ValueError` (a `TypeError` for an argument of the wrong type) that names
the field or argument and the fix. `DistillationTrainer` calls them from `__init__` (arguments and data sets) and
from its probe (the first collated batch), so bad input stops the run before anything is written to `output_dir`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass

import torch
from transformers.models.auto import modeling_auto

from .batch import LABEL_KEYS, student_inputs, teacher_inputs, teacher_key
from .models import unwrap_peft

logger = logging.getLogger(__name__)

# Columns Trainer's collators turn into `labels`.
LABEL_COLUMNS = LABEL_KEYS
IGNORE_INDEX = -100
# Rows per Arrow slice when a data set's columns are scanned (bounded memory on large data sets).
_SCAN_ROWS = 65_536


def _class_names(*mapping_names: str) -> frozenset[str]:
    names = set()
    for mapping_name in mapping_names:
        for value in getattr(modeling_auto, mapping_name, {}).values():
            names.update((value,) if isinstance(value, str) else value)
    return frozenset(names)


_CLASS_HEADS = _class_names(
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
)
_VOCABULARY_HEADS = _class_names(
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
)


# ---------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelLimits:
    """What a model accepts, read from its config and modules (never from a forward pass).

    Attributes:
        role: 'student' or 'teacher', for messages.
        name: the model's class name.
        vocab_size: rows of the input embedding table (token ids must be below it).
        max_positions: learned absolute positions: longer inputs crash inside the model.
        trained_positions: other position schemes (rotary, ...): longer inputs run, untrained.
        label_kind: 'class' (classification heads) or 'vocabulary' (language-model heads).
        label_count: classes or vocabulary entries the head predicts.
        num_channels: image channels (`config.num_channels`).
        image_size: (height, width) of `config.image_size`.
        exact_image_size: the model refuses other image sizes (ViT-like models, unless interpolating).
        main_input: `model.main_input_name`, e.g. 'input_ids' or 'pixel_values'.
        label_names: the forward arguments holding labels (as `Trainer` finds them).
        encoder_decoder: `labels` are decoder tokens, which also need positions.
    """

    role: str
    name: str
    vocab_size: int | None = None
    max_positions: int | None = None
    trained_positions: int | None = None
    label_kind: str | None = None
    label_count: int | None = None
    num_channels: int | None = None
    image_size: tuple[int, int] | None = None
    exact_image_size: bool = False
    main_input: str | None = None
    label_names: tuple[str, ...] = ()
    encoder_decoder: bool = False

    @property
    def label_what(self) -> str:
        return "vocabulary" if self.label_kind == "vocabulary" else "number of labels"


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _pair(value) -> tuple[int, int] | None:
    if _int(value):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_int(v) for v in value):
        return (value[0], value[1])
    return None


def _embedding_rows(getter) -> int | None:
    try:
        module = getter()
    except Exception:  # noqa: BLE001 - vision models raise NotImplementedError; any failure means unknown
        return None
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    return None


def _has_learned_positions(model: torch.nn.Module) -> bool:
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and ("pos" in last or last == "wpe"):
            return True
    return False


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def model_limits(model: torch.nn.Module, role: str) -> ModelLimits:
    """Reads what `model` (a peft wrapper is looked through) accepts; unknown entries stay None."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    name = type(base).__name__
    get = (lambda key: getattr(config, key, None)) if config is not None else (lambda key: None)

    vocab_size = _embedding_rows(getattr(base, "get_input_embeddings", lambda: None))
    if vocab_size is None and _int(get("vocab_size")) and name in _VOCABULARY_HEADS:
        vocab_size = get("vocab_size")

    positions = _int(get("max_position_embeddings"))
    learned = positions is not None and _has_learned_positions(base)

    label_kind = label_count = None
    if name in _CLASS_HEADS:
        count = _int(get("num_labels"))
        # Regression (one output) and multi-label heads take float targets, not class ids.
        if count and count > 1 and get("problem_type") not in ("regression", "multi_label_classification"):
            label_kind, label_count = "class", count
    elif name in _VOCABULARY_HEADS:
        label_kind = "vocabulary"
        label_count = _embedding_rows(getattr(base, "get_output_embeddings", lambda: None)) or _int(get("vocab_size"))

    parameters = _forward_parameters(base)
    label_names = tuple(p for p in parameters if "label" in p)
    if "QuestionAnswering" in name:
        label_names += tuple(p for p in parameters if p in ("start_positions", "end_positions"))
    image_size = _pair(get("image_size"))
    return ModelLimits(
        role=role,
        name=name,
        vocab_size=vocab_size,
        max_positions=positions if learned else None,
        trained_positions=positions if not learned else None,
        label_kind=label_kind,
        label_count=label_count if label_kind else None,
        num_channels=_int(get("num_channels")),
        image_size=image_size,
        exact_image_size=image_size is not None and "interpolate_pos_encoding" in parameters,
        main_input=getattr(base, "main_input_name", None),
        label_names=label_names,
        encoder_decoder=bool(get("is_encoder_decoder")),
    )


def logit_mismatch_error(what: str, student_outputs: int, teacher_outputs: int, role: str = "teacher") -> ValueError:
    """The error for a logit term between heads of different sizes (used before and after the probe forward)."""
    if role.startswith("peer"):
        return ValueError(
            f"The logit term needs the same {what} in every model, but the student has {student_outputs} outputs and "
            f"the {role} {teacher_outputs}: peers must solve the student's task, with the same labels or vocabulary."
        )
    return ValueError(
        f"logit_weight > 0, but the logit term needs the same {what}: the student has {student_outputs} outputs, "
        f"the {role} {teacher_outputs}. Use a student built from the teacher (student_from_teacher) or the same "
        "tokenizer/label set, or set logit_weight=0."
    )


def check_teacher_argument(teacher, role: str = "teacher") -> None:
    """`teacher_model` / `teacher_model_name_or_path` (or a peer's, `role="peer"`) must be a model or a non-empty
    name."""
    fields = (
        "peer_models / peer_model_name_or_path" if role == "peer" else "teacher_model / teacher_model_name_or_path"
    )
    if isinstance(teacher, str):
        if not teacher.strip():
            raise ValueError(f"{fields} holds an empty string; give a Hub id, a local path or a model instance.")
        # A Hub id never starts like a file-system path, so such a name can only be a local folder.
        if teacher.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(teacher)):
            raise ValueError(
                f"Could not load the {role} {teacher!r}: there is no such folder. Check the path given as {fields} "
                "(a folder written by save_pretrained), or give a Hub id."
            )
        return
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(
            f"{fields.split(' / ')[0]} must be a model (torch.nn.Module), a Hub id or a local path, got "
            f"{type(teacher).__name__}."
        )


def check_logit_heads(student: ModelLimits, teacher: ModelLimits, compares_logits: bool) -> None:
    """Heads of different sizes, from the configs, before any forward (ids beyond a vocabulary would crash it)."""
    if not compares_logits or student.label_kind is None or student.label_kind != teacher.label_kind:
        return
    if student.label_count and teacher.label_count and student.label_count != teacher.label_count:
        raise logit_mismatch_error(student.label_what, student.label_count, teacher.label_count, teacher.role)


# ---------------------------------------------------------------------------------------------------- batches
def _key_for(role: str, key: str) -> str:
    return teacher_key(key) if role == "teacher" else key


def _tensor(value) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None


def _channels(count: int) -> str:
    return f"{count} channel" + ("" if count == 1 else "s")


def _describe_image(limits: ModelLimits) -> str:
    parts = []
    if limits.image_size:
        parts.append(f"{limits.image_size[0]}x{limits.image_size[1]} images")
    if limits.num_channels:
        parts.append(_channels(limits.num_channels))
    return " with ".join(parts) or "images"


def check_image_pair(keys, student: ModelLimits, teacher: ModelLimits) -> None:
    """Student and teacher that need differently preprocessed images must get `teacher_pixel_values`."""
    keys = set(keys)
    if "pixel_values" not in keys or teacher_key("pixel_values") in keys:
        return
    sizes_differ = student.image_size and teacher.image_size and student.image_size != teacher.image_size
    channels_differ = student.num_channels and teacher.num_channels and student.num_channels != teacher.num_channels
    if sizes_differ or channels_differ:
        raise ValueError(
            f"The student ({student.name}) takes {_describe_image(student)} and the teacher ({teacher.name}) "
            f"{_describe_image(teacher)}, but the batch holds only `pixel_values`, which both would get. Add a "
            "`teacher_pixel_values` column preprocessed with the teacher's image processor (batch keys prefixed "
            "`teacher_` go to the teacher only), or use a student with the teacher's image_size and num_channels."
        )


def _check_pixels(inputs: dict, limits: ModelLimits, where: str) -> None:
    pixels = _tensor(inputs.get("pixel_values"))
    if pixels is None or pixels.dim() != 4:
        return
    key = _key_for(limits.role, "pixel_values")
    also = " (and give the teacher its own `teacher_pixel_values` if it differs)" if limits.role == "student" else ""
    if limits.num_channels and pixels.shape[1] != limits.num_channels:
        raise ValueError(
            f"{key} in {where} have {_channels(pixels.shape[1])}, but the {limits.role} ({limits.name}) takes "
            f"{_channels(limits.num_channels)} (config.num_channels). Preprocess the images for it, e.g. convert them to RGB or "
            f"grayscale{also}."
        )
    if limits.exact_image_size and not inputs.get("interpolate_pos_encoding"):
        height, width = limits.image_size
        if tuple(pixels.shape[-2:]) != (height, width):
            raise ValueError(
                f"{key} in {where} are {pixels.shape[-2]}x{pixels.shape[-1]}, but the {limits.role} "
                f"({limits.name}) takes {height}x{width} images (config.image_size). Resize them with the "
                f"{limits.role}'s image processor{also}."
            )


def _sequence_keys(limits: ModelLimits) -> tuple[str, ...]:
    return ("input_ids", "decoder_input_ids", "labels") if limits.encoder_decoder else ("input_ids",)


def _length_error(key: str, length: int, limits: ModelLimits, where: str) -> ValueError:
    return ValueError(
        f"{key} in {where} is {length} tokens long, but the {limits.role} ({limits.name}) has only "
        f"{limits.max_positions} positions (config.max_position_embeddings). Truncate when tokenising "
        f"(truncation=True, max_length={limits.max_positions}), lower max_length or the collator's padding length, "
        f"or use a {limits.role} with more positions."
    )


def _token_error(key: str, value: int, limits: ModelLimits, where: str) -> ValueError:
    fix = (
        "Tokenise with the student's tokenizer (a teacher with another tokenizer gets its own `teacher_input_ids`)"
        if limits.role == "student"
        else "Give the teacher ids from its own tokenizer as `teacher_input_ids`"
    )
    return ValueError(
        f"{key} in {where} holds token id {value}, but the {limits.role} ({limits.name}) has a vocabulary of "
        f"{limits.vocab_size} (ids 0..{limits.vocab_size - 1}). {fix}, or use models with the same vocabulary."
    )


def _label_error(key: str, value, limits: ModelLimits, where: str) -> ValueError:
    if limits.label_kind == "vocabulary":
        return ValueError(
            f"{key} in {where} holds {value}, but the student ({limits.name}) has a vocabulary of "
            f"{limits.label_count}: labels must be token ids 0..{limits.label_count - 1}, or -100 to ignore a "
            "position. Tokenise the labels with the student's tokenizer."
        )
    return ValueError(
        f"{key} in {where} holds {value}, but the student ({limits.name}) predicts {limits.label_count} classes "
        f"(config.num_labels={limits.label_count}): labels must lie in 0..{limits.label_count - 1} (or be -100 to "
        "ignore). Re-encode the labels, or build the student and teacher with num_labels covering them."
    )


def check_model_inputs(inputs: dict, limits: ModelLimits, where: str) -> None:
    """One model's inputs from a collated batch: main input present, token ids, lengths, image channels and size."""
    if limits.main_input and limits.main_input not in inputs and "inputs_embeds" not in inputs:
        raise ValueError(
            f"The {limits.role} ({limits.name}) needs `{_key_for(limits.role, limits.main_input)}`"
            + (f" (or `{limits.main_input}`)" if limits.role == "teacher" else "")
            + f", but {where} has none (keys: {sorted(inputs)}). Check that the data set's text or image column "
            "was preprocessed into it."
        )
    ids = _tensor(inputs.get("input_ids"))
    if ids is not None and ids.numel() and not ids.is_floating_point() and limits.vocab_size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limits.vocab_size:
            raise _token_error(
                _key_for(limits.role, "input_ids"), high if high >= limits.vocab_size else low, limits, where
            )
    for key in _sequence_keys(limits):
        value = _tensor(inputs.get(key))
        if value is None or value.dim() < 2:
            continue
        if limits.max_positions and value.shape[-1] > limits.max_positions:
            raise _length_error(_key_for(limits.role, key), value.shape[-1], limits, where)
        if limits.trained_positions and value.shape[-1] > limits.trained_positions:
            logger.warning(
                "%s in %s is %d tokens long, beyond the %s's max_position_embeddings=%d; it runs, but on positions "
                "it was not trained on.",
                _key_for(limits.role, key),
                where,
                value.shape[-1],
                limits.role,
                limits.trained_positions,
            )
    _check_pixels(inputs, limits, where)


def check_labels(batch: dict, limits: ModelLimits, where: str, *, task_loss: bool, require_labels: bool) -> None:
    """The student's labels: present when the task loss is on (and `require_labels`), and within its classes or
    vocabulary. Without the task loss the student never sees them (only -100 matters, for the masks)."""
    if not task_loss:
        return
    present = [k for k in (*limits.label_names, *LABEL_COLUMNS) if batch.get(k) is not None]
    if require_labels and limits.label_names and not present:
        raise ValueError(
            f"task_weight > 0 needs labels, but {where} has no `{limits.label_names[0]}` (keys: {sorted(batch)}). "
            "Add the label column (or fix label_column), or set task_weight=0 for label-free distillation."
        )
    labels = _tensor(batch.get("labels"))
    if labels is None or not labels.numel() or labels.is_floating_point() or not limits.label_count:
        return
    valid = labels.ne(IGNORE_INDEX)
    if not bool(valid.any()):
        return
    values = labels[valid]
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= limits.label_count:
        raise _label_error("labels", high if high >= limits.label_count else low, limits, where)


def check_probe_batch(
    batch: dict,
    student: ModelLimits,
    teacher: ModelLimits,
    *,
    task_loss: bool,
    require_labels: bool = True,
    where: str = "the first batch",
) -> None:
    """Everything a collated batch must satisfy before both models run on it."""
    check_image_pair(batch, student, teacher)
    for_student = student_inputs(batch)
    check_labels(for_student, student, where, task_loss=task_loss, require_labels=require_labels)
    check_model_inputs(for_student, student, where)
    for_teacher = teacher_inputs(batch)
    if teacher.encoder_decoder and "decoder_input_ids" not in for_teacher and "labels" in batch:
        # The teacher decodes the sequence the labels give (the trainer derives its decoder_input_ids from them).
        for_teacher["decoder_input_ids"] = batch["labels"]
    check_model_inputs(for_teacher, teacher, where)


# ---------------------------------------------------------------------------------------------------- data sets
def check_not_empty(dataset, name: str) -> None:
    """A data set with no rows (sized data sets only; an empty iterable is caught by the probe)."""
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_not_empty(value, f"{name}[{key!r}]")
        return
    if dataset is not None and isinstance(dataset, Sized) and len(dataset) == 0:
        raise ValueError(
            f"{name} is empty (0 rows): there is nothing to train or evaluate on. Check the split, any filtering "
            "and max_train_samples/max_eval_samples."
        )


def collator_kind(collator) -> str | None:
    """'plain' for transformers collators that pass columns through, 'lm' for those that make labels from
    input_ids, None for anything else (whose output cannot be predicted from the columns)."""
    from transformers import data as hf_data

    if collator in (
        hf_data.default_data_collator,
        getattr(hf_data.data_collator, "torch_default_data_collator", None),
    ):
        return "plain"
    if isinstance(collator, getattr(hf_data, "DataCollatorWithFlattening", ())):
        return None  # concatenates rows: lengths are not per row
    if isinstance(collator, hf_data.DataCollatorForLanguageModeling):
        return "lm"
    plain = (
        hf_data.DefaultDataCollator,
        hf_data.DataCollatorWithPadding,
        hf_data.DataCollatorForTokenClassification,
        hf_data.DataCollatorForSeq2Seq,
    )
    return "plain" if isinstance(collator, plain) else None


def _padded_length(longest: int, collator) -> int:
    """The length a padding collator gives a batch whose longest row has `longest` tokens."""
    padding = getattr(collator, "padding", None)
    length = longest
    if str(getattr(padding, "value", padding)) == "max_length":
        max_length = getattr(collator, "max_length", None)
        if max_length is None:
            max_length = getattr(getattr(collator, "tokenizer", None), "model_max_length", None)
        if isinstance(max_length, int) and max_length < 10**6:
            length = max(length, max_length)
    multiple = getattr(collator, "pad_to_multiple_of", None)
    if isinstance(multiple, int) and multiple > 0:
        length = math.ceil(length / multiple) * multiple
    return length


@dataclass
class _ColumnStats:
    longest: int = 0
    low: int | None = None
    high: int | None = None


def _flatten(array):
    import pyarrow as pa
    import pyarrow.compute as pc

    while (
        pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type)
    ):
        array = pc.list_flatten(array)
    return array


def _column_stats(dataset, column: str, *, skip_ignored: bool, exact: bool) -> _ColumnStats | None:
    """Longest row and smallest/largest integer of a column, vectorised with Arrow (no Python loop per row); None
    when the column does not hold integers (or lists of them).

    `exact=False` reads every row of the stored table, zero-copy: for a data set made by select/shuffle/split, which
    keeps the whole table plus an index, that is a superset of its rows. `exact=True` reads only the data set's rows
    (gathered through the index, slower); it is needed only when the superset shows a problem.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    feature_type = dataset.data.schema.field(column).type
    is_list = pa.types.is_list(feature_type) or pa.types.is_large_list(feature_type)
    is_list = is_list or pa.types.is_fixed_size_list(feature_type)
    values_type = feature_type
    while hasattr(values_type, "value_type"):
        values_type = values_type.value_type
    if not pa.types.is_integer(values_type):
        return None
    if exact:
        slices = (table.column(column) for table in _arrow_slices(dataset, column))
    else:
        slices = iter([dataset.data.column(column)])
    stats = _ColumnStats()
    for chunked in slices:
        for array in chunked.chunks:
            if is_list and len(array):
                stats.longest = max(stats.longest, pc.max(pc.list_value_length(array)).as_py() or 0)
            values = _flatten(array)
            if skip_ignored:
                values = values.filter(pc.not_equal(values, IGNORE_INDEX))
            if len(values) == 0:
                continue
            extremes = pc.min_max(values)
            low, high = extremes["min"].as_py(), extremes["max"].as_py()
            if low is None:
                continue
            stats.low = low if stats.low is None else min(stats.low, low)
            stats.high = high if stats.high is None else max(stats.high, high)
    return stats


def _arrow_slices(dataset, column: str) -> Iterator:
    return dataset.select_columns([column]).with_format("arrow").iter(batch_size=_SCAN_ROWS)


class _Scanner:
    """Column checks on one data set: fast over every stored row first, exact over its own rows only when the fast
    pass finds a problem (so a bad row outside a select/split never raises, and a clean data set costs one pass)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._cache: dict[tuple, _ColumnStats | None] = {}

    def stats(self, column: str, skip_ignored: bool, exact: bool = False) -> _ColumnStats | None:
        key = (column, skip_ignored, exact)
        if key not in self._cache:
            self._cache[key] = _column_stats(self.dataset, column, skip_ignored=skip_ignored, exact=exact)
        return self._cache[key]

    def check(self, column: str, skip_ignored: bool, problem) -> None:
        """Raises what `problem(stats)` returns (an exception or None) for the data set's own rows."""
        stats = self.stats(column, skip_ignored)
        if stats is None or problem(stats) is None:
            return
        error = problem(self.stats(column, skip_ignored, exact=True))
        if error is not None:
            raise error


def visible_columns(dataset) -> list[str] | None:
    """The columns a `datasets.Dataset` hands out, or None when a transform computes them on the fly."""
    fmt = dataset.format or {}
    if fmt.get("type") == "custom" or (fmt.get("format_kwargs") or {}).get("transform") is not None:
        return None  # with_transform/set_transform: the stored columns are not what the model gets
    columns = dataset.column_names
    if fmt.get("columns") is not None and not fmt.get("output_all_columns"):
        columns = [c for c in columns if c in fmt["columns"]]
    return columns


def check_dataset(
    dataset,
    name: str,
    student: ModelLimits,
    teacher: ModelLimits,
    collator,
    *,
    task_loss: bool,
    require_labels: bool,
) -> None:
    """A `datasets.Dataset`'s columns, scanned with Arrow (no forward, no collation): inputs present, labels present
    (`require_labels`) and within the student's classes or vocabulary (`task_loss`: only the task loss feeds them to
    the student), token ids within both vocabularies, rows no longer than both models' positions. Done only for
    transformers' own collators, whose output follows from the columns."""
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_dataset(
                value,
                f"{name}[{key!r}]",
                student,
                teacher,
                collator,
                task_loss=task_loss,
                require_labels=require_labels,
            )
        return
    check_not_empty(dataset, name)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return
    check_missing_labels(dataset, name, student)
    kind = collator_kind(collator)
    if not isinstance(dataset, datasets.Dataset) or kind is None:
        return
    columns = visible_columns(dataset)
    if columns is None:
        return

    for limits in (student, teacher):
        main = limits.main_input
        if not main:  # a plain nn.Module: its input is not known by name
            continue
        candidates = {main, "inputs_embeds", _key_for(limits.role, main), _key_for(limits.role, "inputs_embeds")}
        if not candidates & set(columns):
            raise ValueError(
                f"The {limits.role} ({limits.name}) needs `{main}`, but {name} has no such column (columns: "
                f"{columns}). Preprocess the data set's text or image column into it (check text_column/"
                "image_column)."
            )
    label_columns = [c for c in (*student.label_names, *LABEL_COLUMNS) if c in columns]
    if require_labels and task_loss and student.label_names and not label_columns and kind != "lm":
        raise ValueError(
            f"task_weight > 0 needs labels, but {name} has no label column (columns: {columns}). Add one named "
            "`labels` (or fix label_column), or set task_weight=0 for label-free distillation."
        )
    scanner = _Scanner(dataset)
    if task_loss and kind != "lm" and student.label_count:
        for column in (c for c in LABEL_COLUMNS if c in columns):
            scanner.check(column, True, lambda stats, c=column: _label_problem(stats, c, student, name, collator))
    if require_labels and task_loss and kind != "lm" and label_columns:
        # Allowed: pure distillation on transfer rows (hfkd.transfer). The labels-only comparison of a recipe is what
        # cannot run without labels; the recipe refuses that itself.
        stats, stored = scanner.stats(label_columns[0], True), dataset.data.column(label_columns[0])
        if (stats.low is None) if stats is not None else stored.null_count == len(stored):
            logger.warning(
                "%s has no labelled row (every label is -100 or missing): the task loss is 0 throughout and only "
                "the distillation terms train. Set task_weight=0 to say so, or add labelled rows.",
                name,
            )

    for limits in (student, teacher):
        column = _key_for(limits.role, "input_ids")
        if column not in columns:
            column = "input_ids"
        if column in columns and (limits.vocab_size or limits.max_positions):
            scanner.check(column, False, lambda stats, c=column, m=limits: _ids_problem(stats, c, m, name, collator))


def check_missing_labels(dataset, name: str, student: ModelLimits) -> None:
    """Missing labels (None) mark transfer rows (hfkd.transfer), which only a head with one class id per row can
    take: refused for token-level, regression and multi-label labels, where None has no -100 to become."""
    from .transfer import missing_label_columns

    for column, per_row in missing_label_columns(dataset).items():
        if per_row and (student.label_kind == "class" or not student.main_input):
            continue
        raise ValueError(
            f"Column {column!r} of {name} has rows without a label (None). A row without a label trains on the "
            "distillation terms alone, which needs one class id per row (a classification head); for token-level "
            "labels give -100 at the positions without one, and for regression or multi-label targets drop or fill "
            "those rows."
        )


def _label_problem(stats: _ColumnStats, column: str, student: ModelLimits, name: str, collator) -> Exception | None:
    if stats.low is not None and (stats.low < 0 or stats.high >= student.label_count):
        bad = stats.high if stats.high >= student.label_count else stats.low
        return _label_error(f"Column {column!r}", bad, student, name)
    if student.encoder_decoder and student.max_positions:  # labels are the decoder's tokens
        length = _padded_length(stats.longest, collator)
        if length > student.max_positions:
            return _length_error(f"Column {column!r}", length, student, name)
    return None


def _ids_problem(stats: _ColumnStats, column: str, limits: ModelLimits, name: str, collator) -> Exception | None:
    if limits.max_positions:
        length = _padded_length(stats.longest, collator)
        if length > limits.max_positions:
            return _length_error(f"Column {column!r}", length, limits, name)
    if limits.vocab_size and stats.low is not None and (stats.low < 0 or stats.high >= limits.vocab_size):
        bad = stats.high if stats.high >= limits.vocab_size else stats.low
        return _token_error(f"Column {column!r}", bad, limits, name)
    return None


# ---------------------------------------------------------------------------------------------------- output_dir
@contextlib.contextmanager
def removing_new_output_dir(output_dir: str | None) -> Iterator[None]:
    """Undoes the creation of `output_dir` (and of its missing parents) when the block fails.

    `Trainer.__init__` creates `output_dir` before hfkd can look at the data; a check that fails afterwards must not
    leave an empty folder behind. Folders that existed before, or that hold anything, are never touched.
    """
    created = []
    if output_dir:
        path = os.path.abspath(output_dir)
        while path and not os.path.exists(path):
            created.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                break  # not empty, not there, or not ours to remove: stop climbing
        raise
