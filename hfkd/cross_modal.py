"""Batches for a teacher and a student that read different modalities of the same rows: cross-modal distillation.

The teacher sees one modality of a row and the student another (Gupta, Hoffman & Malik, CVPR 2016, "Cross Modal
Distillation for Supervision Transfer": paired RGB and depth images; Aytar, Vondrick & Torralba, NeurIPS 2016,
"SoundNet": a vision teacher's class distributions teach a sound student on the frames and sound of the same videos).
Each model reads its own columns through its own processor: a tokenizer reads text, a feature extractor audio (one
float array per row), an image processor images. `CrossModalCollator` generalises what `TwoTokenizerCollator`
(hfkd.two_tokenizers) does for two tokenizers of one text:

```python
collator = CrossModalCollator(
    student_processor=feature_extractor, teacher_processor=tokenizer,
    student_columns="audio", teacher_columns="text", sampling_rate=16_000,
)
trainer = DistillationTrainer(model=audio_student, teacher_model=text_teacher, args=DistillationConfig(...),
                              train_dataset=rows, data_collator=collator, processing_class=feature_extractor)
```

Each batch holds the student's inputs as its processor names them (`input_features`, `input_values`,
`attention_mask`, ...), the teacher's under the `teacher_` prefix (`teacher_input_ids`, ...), which hfkd.batch gives
the teacher alone, and the rows' other values (`labels`; -100 or None for transfer rows, which have no label). Only
terms that compare whole examples' outputs work across modalities (`Term.across_modalities`: `logit` and `dkd`, with
classifiers that share their labels, as SoundNet's KL between class distributions): the two models' positions
(tokens, audio frames, patches) do not correspond, so token-level terms are refused before anything is written.
"""

from collections.abc import Sequence

import torch

from .batch import TEACHER_PREFIX

MODALITIES = ("text", "audio", "image")
# Label columns under other names, stacked as `labels` (the name the student's forward takes).
_LABEL_NAMES = ("label", "label_ids")


def modality(processor) -> str:
    """What a processor reads: 'text' (a tokenizer), 'audio' (a sequence feature extractor) or 'image' (an image
    processor); a multimodal processor counts as its feature extractor or image processor."""
    from transformers import PreTrainedTokenizerBase
    from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
    from transformers.image_processing_utils import BaseImageProcessor

    inner = _inner(processor)
    if isinstance(inner, PreTrainedTokenizerBase):
        return "text"
    if isinstance(inner, SequenceFeatureExtractor):
        return "audio"
    if isinstance(inner, BaseImageProcessor):
        return "image"
    raise ValueError(
        f"{type(processor).__name__} is neither a tokenizer, an audio feature extractor nor an image processor, so "
        "hfkd cannot tell which modality it reads; give the model's own processor (AutoTokenizer, "
        "AutoFeatureExtractor or AutoImageProcessor .from_pretrained(...))."
    )


def _inner(processor):
    """The part of a multimodal processor (ProcessorMixin) that reads the model's input, else the processor."""
    for name in ("feature_extractor", "image_processor", "tokenizer"):
        part = getattr(processor, name, None)
        if part is not None and part is not processor:
            return part
    return processor


def _columns(value, field_name: str) -> tuple[str, ...]:
    columns = (value,) if isinstance(value, str) else tuple(value or ())
    if not columns or not all(isinstance(c, str) and c for c in columns):
        raise ValueError(f"{field_name} must name the column(s) of the rows this model reads, got {value!r}.")
    return columns


class _Side:
    """One model's view of a row: its columns, read by its processor."""

    def __init__(self, role: str, processor, columns, field_name: str, collator: "CrossModalCollator"):
        self.role, self.processor, self.field = role, _inner(processor), field_name
        self.modality = modality(processor)
        self.columns = _columns(columns, field_name)
        most = 2 if self.modality == "text" else 1
        if len(self.columns) > most:
            what = "a text and its pair" if most == 2 else f"one {self.modality} column"
            raise ValueError(
                f"{field_name}={list(self.columns)}: the {role}'s {type(self.processor).__name__} reads {what}; "
                f"name {'at most two columns' if most == 2 else 'one column'}."
            )
        if self.modality == "text" and getattr(self.processor, "pad_token_id", None) is None:
            raise ValueError(
                f"The {role}'s tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = "
                "tokenizer.eos_token (padding positions are masked)."
            )
        if self.modality == "audio":
            expected = getattr(self.processor, "sampling_rate", None)
            if collator.sampling_rate is None:
                raise ValueError(
                    f"The {role} reads audio ({field_name}={list(self.columns)}): give sampling_rate=<the rate of the "
                    f"rows' audio arrays, in Hz> (its feature extractor expects {expected} Hz)."
                )
            if expected is not None and int(expected) != int(collator.sampling_rate):
                raise ValueError(
                    f"sampling_rate={collator.sampling_rate}: the rows' audio is at {collator.sampling_rate} Hz, but "
                    f"the {role}'s feature extractor ({type(self.processor).__name__}) expects {expected} Hz, and "
                    f"its features would describe other frequencies than the ones it was made for. Resample the "
                    f"audio to {expected} Hz (and set sampling_rate={expected}), or give the {role} a feature "
                    f"extractor made for {collator.sampling_rate} Hz."
                )
        self.collator = collator

    def value(self, row: dict, index: int, column: str):
        if not isinstance(row, dict) or column not in row:
            raise ValueError(
                f"Row {index} of the batch has no {column!r} column, which the {self.role} reads ({self.field}="
                f"{list(self.columns)}); its columns are {sorted(row) if isinstance(row, dict) else type(row)}. "
                f"Every cross-modal row needs both models' columns: drop rows without it, or fix {self.field}."
            )
        value = row[column]
        if value is None:
            raise ValueError(
                f"Row {index} of the batch has no value in its {column!r} column, which the {self.role} reads "
                f"({self.field}={list(self.columns)}): a cross-modal row needs both modalities. Drop rows without "
                f"it (e.g. dataset.filter(lambda r: r[{column!r}] is not None)), or fix them."
            )
        if self.modality == "audio" and isinstance(value, dict):  # a datasets Audio feature: {"array", ...}
            rate = value.get("sampling_rate")
            if rate is not None and int(rate) != int(self.collator.sampling_rate):
                raise ValueError(
                    f"Row {index}'s {column!r} audio is at {rate} Hz, but sampling_rate={self.collator.sampling_rate}; "
                    f"resample the column (dataset.cast_column({column!r}, datasets.Audio(sampling_rate="
                    f"{self.collator.sampling_rate}))) or fix sampling_rate."
                )
            value = value["array"]
        return value

    def encode(self, rows: Sequence[dict]) -> dict:
        values = [[self.value(row, i, c) for i, row in enumerate(rows)] for c in self.columns]
        c = self.collator
        if self.modality == "text":
            out = self.processor(
                values[0],
                values[1] if len(values) > 1 else None,
                padding=True,
                truncation=c.max_length is not None,
                max_length=c.max_length,
                pad_to_multiple_of=c.pad_to_multiple_of,
                return_tensors="pt",
            )
        elif self.modality == "audio":
            arrays = [torch.as_tensor(v, dtype=torch.float32).reshape(-1).numpy() for v in values[0]]
            padding, kwargs = _padding(self.processor), {}
            if c.max_seconds is not None and padding is True:  # a fixed-window extractor (Whisper) cuts to its own
                kwargs = {"truncation": True, "max_length": int(c.max_seconds * c.sampling_rate)}
            out = self.processor(arrays, sampling_rate=c.sampling_rate, padding=padding, return_tensors="pt", **kwargs)
        else:
            out = self.processor(values[0], return_tensors="pt")
        return dict(out)


def _padding(feature_extractor):
    """Feature extractors that read a fixed window (Whisper's 30 s, or its `chunk_length`) pad to it; others to
    the longest row of the batch."""
    return "max_length" if getattr(feature_extractor, "nb_max_frames", None) else True


class CrossModalCollator:
    """Collates rows that hold a teacher's and a student's modality of the same example, each through its own
    processor.

    Args:
        student_processor / teacher_processor: each model's own tokenizer, feature extractor or image processor.
        student_columns / teacher_columns: the column each model reads (a tokenizer may read two: a text and its
            pair). Every row needs both.
        sampling_rate: the rate, in Hz, of the rows' audio arrays; checked against each feature extractor's.
        max_length: tokens per text at most (None: no cut).
        max_seconds: audio seconds per row at most (None: no cut; feature extractors with a fixed window, such as
            Whisper's, cut and pad to it themselves).
        pad_to_multiple_of: passed to the tokenizers.
    """

    def __init__(
        self,
        student_processor,
        teacher_processor,
        student_columns,
        teacher_columns,
        sampling_rate: int | None = None,
        max_length: int | None = None,
        max_seconds: float | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        if sampling_rate is not None and (isinstance(sampling_rate, bool) or int(sampling_rate) <= 0):
            raise ValueError(f"sampling_rate must be a positive number of Hz, got {sampling_rate!r}.")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0 (None: no cut), got {max_seconds!r}.")
        self.sampling_rate = sampling_rate
        self.max_length = max_length
        self.max_seconds = max_seconds
        self.pad_to_multiple_of = pad_to_multiple_of
        self.student = _Side("student", student_processor, student_columns, "student_columns", self)
        self.teacher = _Side("teacher", teacher_processor, teacher_columns, "teacher_columns", self)
        shared = set(self.student.columns) & set(self.teacher.columns)
        if shared and self.student.modality != self.teacher.modality:
            raise ValueError(
                f"student_columns and teacher_columns both name {sorted(shared)}, but the student reads "
                f"{self.student.modality} and the teacher {self.teacher.modality}: name each model's own column."
            )

    def input_columns(self) -> set[str]:
        """The columns the processors read (Trainer must not drop them as unused by the student's forward)."""
        return set(self.student.columns) | set(self.teacher.columns)

    def __call__(self, features: Sequence[dict]) -> dict:
        rows = list(features)
        batch = self.student.encode(rows)
        batch.update({TEACHER_PREFIX + k: v for k, v in self.teacher.encode(rows).items()})
        read = self.input_columns()
        for key in (k for k in rows[0] if k not in read):
            try:
                batch[key] = torch.tensor([row.get(key) for row in rows])
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(
                    f"The column {key!r} holds values that cannot be stacked into a tensor ({err}); CrossModalCollator "
                    "reads only the models' columns (student_columns, teacher_columns) and stacks one value per row "
                    "of the others (labels, ids). Remove the column, or name it in student_columns or "
                    "teacher_columns."
                ) from err
        for name in _LABEL_NAMES:
            if name in batch and "labels" not in batch:
                batch["labels"] = batch.pop(name)
        return batch

    # ------------------------------------------------------------------ checks before the first step
    def check_models(self, student=None, teachers: dict | None = None) -> None:
        """Each processor must make what its model reads: refused before anything is written, naming the field."""
        if student is not None:
            check_processor(self.student.processor, student, "student", "student_processor")
        for name, teacher in (teachers or {}).items():
            role = "teacher" if name == "teacher" else f"teacher {name!r}"
            check_processor(self.teacher.processor, teacher, role, "teacher_processor")

    def check_dataset(self, dataset, which: str) -> None:
        """A `datasets.Dataset` (or dict of them) must hold every column both models read, with a value in each row
        (checked on the stored Arrow table, without a pass over the rows)."""
        if isinstance(dataset, dict):
            for name, one in dataset.items():
                self.check_dataset(one, f"{which}[{name!r}]")
            return
        columns = getattr(dataset, "column_names", None)
        if not isinstance(columns, list):
            return  # not a datasets.Dataset: each batch is checked as it is collated
        for side in (self.student, self.teacher):
            for column in side.columns:
                if column not in columns:
                    raise ValueError(
                        f"{which} has no {column!r} column, which the {side.role} reads ({side.field}="
                        f"{list(side.columns)}; its {side.modality}); the columns are {columns}. Every cross-modal "
                        f"row needs both models' columns: add it, or set {side.field} to the column that holds the "
                        f"{side.role}'s {side.modality}."
                    )
                missing = dataset.data.column(column).null_count
                if missing:
                    raise ValueError(
                        f"{which}: {missing} row(s) have no value in the {column!r} column, which the {side.role} "
                        f"reads ({side.field}={list(side.columns)}): a cross-modal row needs both modalities. Drop "
                        f"them first (dataset.filter(lambda r: r[{column!r}] is not None)) or fill them."
                    )


def check_processor(processor, model, role: str, field_name: str) -> None:
    """`processor` must make the input `model` reads (`main_input_name`), and fit its config where the config says
    (a tokenizer's ids within its embedding, a feature extractor's mel bins)."""
    from .models import unwrap_peft

    model = unwrap_peft(model)
    inner = _inner(processor)
    main = getattr(model, "main_input_name", None)
    makes = list(getattr(inner, "model_input_names", None) or [])
    name = type(model).__name__
    if main and makes and main not in makes:
        raise ValueError(
            f"{field_name} ({type(inner).__name__}, a {modality(processor)} processor) makes {makes}, but the {role} "
            f"({name}) reads `{main}`: it is not the {role}'s processor. Give {field_name} the {role}'s own "
            f"({_which_auto(main)}.from_pretrained(<the {role}'s folder or Hub id>))."
        )
    config = getattr(model, "config", None)
    if modality(processor) == "text" and hasattr(model, "get_input_embeddings"):
        embeddings = model.get_input_embeddings()
        rows = getattr(embeddings, "num_embeddings", None)
        if rows is not None and len(inner) > rows:
            raise ValueError(
                f"{field_name} has {len(inner)} tokens but the {role}'s embedding ({name}) holds {rows}: it is not "
                f"the {role}'s tokenizer. Give the tokenizer the {role} was trained with."
            )
    bins, size = getattr(config, "num_mel_bins", None), getattr(inner, "feature_size", None)
    if modality(processor) == "audio" and isinstance(bins, int) and isinstance(size, int) and bins != size:
        raise ValueError(
            f"{field_name} ({type(inner).__name__}) makes {size} features per frame (feature_size), but the {role} "
            f"({name}) reads {bins} (num_mel_bins): give it the {role}'s own feature extractor, or one with "
            f"feature_size={bins}."
        )


def _which_auto(main_input: str) -> str:
    return {"input_ids": "AutoTokenizer", "pixel_values": "AutoImageProcessor"}.get(main_input, "AutoFeatureExtractor")


def cross_modal_collator(collator) -> CrossModalCollator | None:
    """The CrossModalCollator inside hfkd's collator wrappers (missing labels, row ids), or None."""
    while not isinstance(collator, CrossModalCollator) and hasattr(collator, "collator"):
        collator = collator.collator
    return collator if isinstance(collator, CrossModalCollator) else None


def check_terms_across_modalities(names: Sequence[str]) -> None:
    """Refuses terms that compare positions (tokens, frames, patches), which two models reading their own columns
    do not share."""
    from .terms import TERMS

    refused = [name for name in names if name in TERMS and not TERMS[name].across_modalities]
    if refused:
        raise ValueError(
            f"The terms {refused} compare the two models position by position (tokens, frames, patches) or by "
            "features of those positions, but the teacher and the student read different modalities "
            "(CrossModalCollator), whose positions do not correspond. Across modalities use the terms that compare "
            "each example's class distribution: logit (logit_weight) and dkd; set the others' weights to 0 (e.g. "
            "hidden_weight=0, attention_weight=0) or drop them from `terms`."
        )


def setup_cross_modal(model, args, source, teacher_processing_class, trainer_args: tuple, trainer_kwargs: dict):
    """When the trainer's collator is a CrossModalCollator: refuses what cannot run when each model reads its own
    columns (even two texts, say a sentence and its translation, share no positions) and checks the processors
    against the models and the data, before Trainer creates output_dir. Returns the collator (None for any other)."""
    given = trainer_args[0] if trainer_args else trainer_kwargs.get("data_collator")
    collator = cross_modal_collator(given)
    if collator is None:
        return None
    refused = [
        (name, fix)
        for name, on, fix in (
            (
                "teacher_processing_class",
                teacher_processing_class is not None or args.teacher_processing_class is not None,
                "unset it: CrossModalCollator carries the teacher's processor",
            ),
            (source.described_as, source.described_as is not None, "use a teacher model"),
            ("augment", bool(args.augment), "unset augment: a view of one modality would not change the other's"),
            ("lmbda > 0 or seq_kd", args.lmbda > 0 or args.seq_kd, "set lmbda=0 and seq_kd=False"),
            (
                "train_sampling_strategy='group_by_length'",
                args.train_sampling_strategy == "group_by_length",
                "use the default sampling (the rows hold raw text and audio, not the lengths it reads)",
            ),
        )
        if on
    ]
    if refused:
        name, fix = refused[0]
        raise ValueError(
            f"{name} cannot be combined with cross-modal distillation (CrossModalCollator: the student reads "
            f"{collator.student.modality}, the teacher {collator.teacher.modality}) yet; {fix}."
        )
    check_terms_across_modalities([spec.name for spec in args.term_specs])
    collator.check_models(model, source.models())
    for which in ("train_dataset", "eval_dataset"):
        index = 1 if which == "train_dataset" else 2
        dataset = trainer_args[index] if len(trainer_args) > index else trainer_kwargs.get(which)
        collator.check_dataset(dataset, which)
    return collator
