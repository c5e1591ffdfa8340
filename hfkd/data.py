"""Data for the recipes: any `datasets.load_dataset` source, a held-out split, and per-task preprocessing."""

import bisect
import json
import logging
import os
from dataclasses import dataclass, field

import datasets
import numpy as np

from .paths import resolve_path

logger = logging.getLogger(__name__)

TASKS = ("text-classification", "image-classification", "causal-lm")
UNSEEN_EVAL_LABELS = ("error", "drop")


@dataclass
class DataArguments:
    """Where the data comes from and which columns hold what."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub data set id (e.g. 'glue'), or a builder for local files: 'csv', 'json', 'parquet', "
            "'text', 'imagefolder'."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub data set configuration, e.g. 'sst2'."}
    )
    data_files: str | None = field(
        default=None,
        metadata={
            "help": "Local files for a builder: a path or glob, comma-separated paths, or a JSON object of splits "
            '(\'{"train": "a.csv", "test": "b.csv"}\'). \'pkg:<package>/<path>\' points inside an installed '
            "Python package."
        },
    )
    dataset_kwargs: str | None = field(
        default=None,
        metadata={"help": 'Extra `load_dataset` keyword arguments as JSON, e.g. \'{"encoding": "latin-1"}\'.'},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Held-out split to evaluate teacher and student on; when unset, carved from train."},
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Share of train held out (with the run's seed) when there is no eval_split."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pair tasks."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    image_column: str = field(default="image", metadata={"help": "Column holding the image."})
    audio_column: str = field(
        default="audio",
        metadata={
            "help": "Column holding audio, one float array (mono) per row at audio_sampling_rate: what a student of "
            "student_modality=audio hears (cross-modal distillation, hfkd.cross_modal)."
        },
    )
    audio_sampling_rate: int = field(
        default=16_000,
        metadata={
            "help": "The rate, in Hz, of audio_column's arrays; it must be the rate the student's feature extractor "
            "(student_processor) expects (16,000 for transformers' speech models): resample the audio first."
        },
    )
    max_length: int = field(
        default=128,
        metadata={
            "help": "Maximum tokens per example (causal LM: the length of each text block; with a student that has its "
            "own tokenizer, each piece of text, cut at whitespace, holds at most this many tokens of either model)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many held-out rows."})
    transfer_split: str | None = field(
        default=None,
        metadata={
            "help": "A split of the same data set whose rows are added to distillation as transfer rows: a row "
            "without a label (or every row, with transfer_ignore_labels) trains on the distillation terms alone; a "
            "row with a label keeps it and counts as a labelled row. Classifiers only."
        },
    )
    transfer_data_files: str | None = field(
        default=None,
        metadata={
            "help": "Data file(s) of transfer rows, as data_files (a path or glob, comma-separated paths, "
            "'pkg:<package>/<path>'), read by dataset_name when it is a builder such as 'csv', else by the builder "
            "their extension names (.csv, .tsv, .json, .jsonl, .parquet, .arrow, .txt); or one folder written by "
            "datasets' save_to_disk (e.g. by `hfkd synthesize`). They need the training data's text (or image) "
            "columns; rows are treated as with transfer_split."
        },
    )
    keep_unlabelled_rows: bool = field(
        default=False,
        metadata={
            "help": "Keep the training split's rows without a label as transfer rows (distillation terms alone) "
            "instead of dropping them; held-out rows without a label are still dropped."
        },
    )
    labelled_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Keep the label of only this many training rows, a random choice with the run's seed (after "
            "max_train_samples and rows without a label); the other training rows become transfer rows. For "
            "experiments with a share of the labels (e.g. 10 percent of them)."
        },
    )
    max_transfer_samples: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many transfer rows (a random choice with the run's seed)."},
    )
    transfer_ignore_labels: bool = field(
        default=False,
        metadata={
            "help": "Treat every row of transfer_split / transfer_data_files as a transfer row, even one that has a "
            "label (labels of classes the training split lacks are refused otherwise)."
        },
    )
    unseen_eval_labels: str = field(
        default="error",
        metadata={
            "help": "Held-out rows whose label never occurs in the training split (classes come from training "
            "alone: no model can learn a class without a training row): 'error' refuses the data, naming each such "
            "label and its count; 'drop' drops those rows with a warning, and the card's data note says how many.",
            "choices": list(UNSEEN_EVAL_LABELS),
        },
    )

    def __post_init__(self):
        if self.dataset_name is None:
            raise ValueError("dataset_name is required: a Hub id or a builder such as 'csv' with data_files.")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}.")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}.")
        if (
            isinstance(self.audio_sampling_rate, bool)
            or not isinstance(self.audio_sampling_rate, int)
            or (self.audio_sampling_rate <= 0)
        ):
            raise ValueError(f"audio_sampling_rate must be a positive number of Hz, got {self.audio_sampling_rate!r}.")
        if self.unseen_eval_labels not in UNSEEN_EVAL_LABELS:
            raise ValueError(
                f"unseen_eval_labels must be one of {list(UNSEEN_EVAL_LABELS)}, got {self.unseen_eval_labels!r}."
            )
        for name in ("max_train_samples", "max_eval_samples", "max_transfer_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}.")
        self._check_transfer()

    def _check_transfer(self) -> None:
        if self.labelled_train_samples is not None and self.labelled_train_samples < 0:
            raise ValueError(
                f"labelled_train_samples must be >= 0 (the training rows that keep their label), got "
                f"{self.labelled_train_samples}."
            )
        if self.transfer_split is not None and self.transfer_data_files is not None:
            raise ValueError(
                "transfer_split and transfer_data_files are both set: transfer_split names a split of the data set, "
                "transfer_data_files files of their own. Give one."
            )
        if self.transfer_split is not None and self.transfer_split in (self.train_split, self.eval_split):
            which = "train_split" if self.transfer_split == self.train_split else "eval_split"
            fix = (
                "use keep_unlabelled_rows or labelled_train_samples to turn training rows into transfer rows"
                if which == "train_split"
                else "the held-out rows must stay unseen"
            )
            raise ValueError(f"transfer_split={self.transfer_split!r} is also {which}; {fix}.")
        data_options = self.transfer_split is not None or self.transfer_data_files is not None
        if self.transfer_ignore_labels and not data_options:
            raise ValueError(
                "transfer_ignore_labels=true applies to the rows of transfer_split or transfer_data_files, and "
                "neither is set; set one, or unset transfer_ignore_labels."
            )
        if self.max_transfer_samples is not None and not (
            data_options or self.keep_unlabelled_rows or self.labelled_train_samples is not None
        ):
            raise ValueError(
                "max_transfer_samples caps transfer rows, but no option makes any (transfer_split, "
                "transfer_data_files, keep_unlabelled_rows, labelled_train_samples); set one, or unset it."
            )

    def transfer_options(self) -> list[str]:
        """The transfer-row options this run sets (empty: every training row is labelled, as without them)."""
        return [
            name
            for name in TRANSFER_OPTIONS
            if getattr(self, name) != DataArguments.__dataclass_fields__[name].default
        ]


TRANSFER_OPTIONS = (
    "transfer_split",
    "transfer_data_files",
    "keep_unlabelled_rows",
    "labelled_train_samples",
    "max_transfer_samples",
    "transfer_ignore_labels",
)


def _data_files(spec: str | None):
    if spec is None:
        return None
    text = spec.strip()
    if text.startswith("{"):
        mapping = json.loads(text)
        return {split: _data_files_list(files) for split, files in mapping.items()}
    return _data_files_list(text)


def _data_files_list(files) -> list[str]:
    parts = files if isinstance(files, list) else [p for p in str(files).split(",") if p.strip()]
    return [resolve_path(p.strip()) for p in parts]


def _load(args: DataArguments):
    kwargs = json.loads(args.dataset_kwargs) if args.dataset_kwargs else {}
    return datasets.load_dataset(
        args.dataset_name, args.dataset_config_name, data_files=_data_files(args.data_files), **kwargs
    )


def load_splits(args: DataArguments, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Loads the train and held-out splits; the held-out one is carved from train when none is named."""
    loaded = _load(args)
    if args.train_split not in loaded:
        raise ValueError(f"train_split={args.train_split!r} is not in the data set; it has {list(loaded)}.")
    train = loaded[args.train_split]
    if args.eval_split is not None:
        if args.eval_split not in loaded:
            raise ValueError(f"eval_split={args.eval_split!r} is not in the data set; it has {list(loaded)}.")
        held_out = loaded[args.eval_split]
    else:
        parts = train.train_test_split(test_size=args.eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
    if args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        held_out = held_out.select(range(min(args.max_eval_samples, len(held_out))))
    if len(train) == 0 or len(held_out) == 0:
        raise ValueError(f"Empty data: {len(train)} training and {len(held_out)} held-out rows.")
    return train, held_out


def _require_columns(dataset: datasets.Dataset, columns: dict[str, str | None]) -> None:
    for field_name, column in columns.items():
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"{field_name}={column!r} is not a column of the data set (columns: {dataset.column_names}); set "
                f"--{field_name} to the right one."
            )


def _has_label(value) -> bool:
    # An empty CSV cell arrives as None (text columns) or NaN (number columns); neither is a class.
    if value is None or (isinstance(value, float) and value != value):
        return False
    return not (isinstance(value, str) and not value.strip())


def _label_key(value) -> str:
    # A number column with an empty cell is read as floats: 1.0 is the class "1", as in the column without gaps.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def drop_unlabelled(
    train: datasets.Dataset, held_out: datasets.Dataset, args: DataArguments
) -> tuple[datasets.Dataset, datasets.Dataset, str | None]:
    """Drops rows whose label cell is empty, and says how many went; an empty cell never becomes a class."""
    _require_columns(train, {"label_column": args.label_column})
    _require_columns(held_out, {"label_column": args.label_column})
    column = args.label_column
    if isinstance(train.features[column], datasets.ClassLabel):
        return train, held_out, None
    kept, dropped = [], []
    for split in (train, held_out):
        labelled = split.filter(
            lambda batch: [_has_label(v) for v in batch[column]], batched=True, desc="Dropping rows without a label"
        )
        kept.append(labelled)
        dropped.append(len(split) - len(labelled))
    if not sum(dropped):
        return train, held_out, None
    note = (
        f"{dropped[0]} training and {dropped[1]} held-out rows without a {column!r} label (label_column) were dropped"
    )
    logger.warning("%s.", note)
    if len(kept[0]) == 0 or len(kept[1]) == 0:
        raise ValueError(f"{note}, which leaves {len(kept[0])} training and {len(kept[1])} held-out rows.")
    return kept[0], kept[1], note


# ---------------------------------------------------------------------------------------------------- transfer rows
IGNORE_INDEX = -100
_EXTENSION_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
    ".txt": ("text", {}),
}
_FILE_BUILDERS = ("csv", "json", "parquet", "arrow", "text", "imagefolder", "pandas")


def _missing(value, feature) -> bool:
    """No label: an empty cell, or -1 in a ClassLabel column (how `datasets` marks an unlabelled row)."""
    if isinstance(feature, datasets.ClassLabel):
        return value is None or value < 0
    return not _has_label(value)


def split_unlabelled(train: datasets.Dataset, args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training rows with a label and those without one (keep_unlabelled_rows keeps these as transfer rows)."""
    _require_columns(train, {"label_column": args.label_column})
    feature = train.features[args.label_column]
    flags = [_missing(v, feature) for v in train[args.label_column]]
    return (
        train.select([i for i, missing in enumerate(flags) if not missing]),
        train.select([i for i, missing in enumerate(flags) if missing]),
    )


def load_transfer_data(args: DataArguments) -> datasets.Dataset | None:
    """The rows of transfer_split or transfer_data_files (None when neither is set)."""
    if args.transfer_split is not None:
        loaded = _load(args)
        if args.transfer_split not in loaded:
            raise ValueError(
                f"transfer_split={args.transfer_split!r} is not in the data set; it has {list(loaded)}. Name one of "
                "them, or give the rows as transfer_data_files."
            )
        return loaded[args.transfer_split]
    if args.transfer_data_files is None:
        return None
    files = _data_files_list(args.transfer_data_files)
    if len(files) == 1 and _saved_dataset(files[0]):
        loaded = datasets.load_from_disk(files[0])
        if isinstance(loaded, datasets.DatasetDict):
            return datasets.concatenate_datasets([loaded[split] for split in loaded])
        return loaded
    kwargs = json.loads(args.dataset_kwargs) if args.dataset_kwargs else {}
    if args.dataset_name in _FILE_BUILDERS:
        builder = args.dataset_name  # the training data's builder, with its keyword arguments
    else:
        extension = os.path.splitext(files[0])[1].lower()
        if extension not in _EXTENSION_BUILDERS:
            raise ValueError(
                f"transfer_data_files={args.transfer_data_files!r}: no builder is known for the extension "
                f"{extension!r}; give {', '.join(_EXTENSION_BUILDERS)} files, or set dataset_name to a builder "
                f"({', '.join(_FILE_BUILDERS)})."
            )
        builder, kwargs = _EXTENSION_BUILDERS[extension]
    try:
        loaded = datasets.load_dataset(builder, data_files=files, **kwargs)
    except FileNotFoundError as err:
        raise ValueError(f"transfer_data_files={args.transfer_data_files!r}: {err}") from err
    return datasets.concatenate_datasets([loaded[split] for split in loaded])


def _saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")
    )


@dataclass
class TrainingRows:
    """The training rows of a classifier, before preprocessing: those that keep their label and the transfer rows
    (trained on the distillation terms alone), each a list of parts from different sources."""

    labelled: list
    transfer: list
    sources: dict = field(default_factory=dict)
    """Transfer rows by where they came from, for the card (one entry per part of `transfer`)."""
    capped_from: int | None = None
    """How many transfer rows there were before max_transfer_samples chose among them (None: not capped)."""

    @property
    def labelled_count(self) -> int:
        return sum(len(d) for d in self.labelled)

    @property
    def transfer_count(self) -> int:
        return sum(len(d) for d in self.transfer)

    def note(self) -> str | None:
        """The split in words (None without transfer rows)."""
        if not self.transfer_count:
            return None
        parts = ", ".join(f"{count} {source}" for source, count in self.sources.items() if count)
        capped = f", chosen from {self.capped_from} (max_transfer_samples)" if self.capped_from is not None else ""
        return (
            f"{self.labelled_count} labelled and {self.transfer_count} transfer rows (without a label: trained on "
            f"the distillation terms alone; {parts}{capped})"
        )


def training_rows(
    train: datasets.Dataset,
    names: list[str],
    args: DataArguments,
    seed: int,
    inputs: dict[str, str | None],
    unlabelled: datasets.Dataset | None = None,
) -> TrainingRows:
    """Splits a classifier's training data into labelled and transfer rows, as the transfer options say.

    `train` holds the labelled training rows, `names` the classes, `inputs` the input columns by field name (text or
    image), `unlabelled` the training rows without a label (keep_unlabelled_rows)."""
    rows = TrainingRows([train], [])
    if unlabelled is not None and len(unlabelled):
        rows.transfer.append(unlabelled)
        rows.sources["training rows without a label (keep_unlabelled_rows)"] = len(unlabelled)
    n = args.labelled_train_samples
    if n is not None:
        if n > len(train):
            raise ValueError(
                f"labelled_train_samples={n} is more than the {len(train)} labelled training rows (after "
                "max_train_samples and rows without a label); lower it, or raise max_train_samples."
            )
        order = np.random.default_rng(seed).permutation(len(train))
        rows.labelled = [train.select(sorted(order[:n].tolist()))]
        rest = train.select(sorted(order[n:].tolist()))
        if len(rest):
            rows.transfer.append(rest)
            rows.sources[f"training rows whose label was set aside (labelled_train_samples={n})"] = len(rest)
    extra = load_transfer_data(args)
    if extra is not None:
        _add_transfer_data(rows, extra, names, args, inputs)
    _cap_transfer(rows, args.max_transfer_samples, seed)
    return rows


def _add_transfer_data(rows: TrainingRows, extra, names: list[str], args: DataArguments, inputs: dict) -> None:
    field_name = "transfer_split" if args.transfer_split is not None else "transfer_data_files"
    where = f"{field_name}={getattr(args, field_name)!r}"
    if len(extra) == 0:
        raise ValueError(f"{where} holds no row; check it, or unset {field_name}.")
    for name, column in inputs.items():
        if column is not None and column not in extra.column_names:
            raise ValueError(
                f"{name}={column!r} is not a column of the transfer rows ({where}; columns: {extra.column_names}): "
                "transfer rows need the training data's inputs. Rename the column in the transfer data, or fix "
                f"{name}."
            )
    column = args.label_column
    source = f"rows of {where}"
    if args.transfer_ignore_labels or column not in extra.column_names:
        rows.transfer.append(extra)
        rows.sources[source] = len(extra)
        return
    feature = extra.features[column]
    keys = [None if _missing(v, feature) else _transfer_key(v, feature) for v in extra[column]]
    known = set(names)
    unseen: dict[str, int] = {}
    for key in keys:
        if key is not None and key not in known:
            unseen[key] = unseen.get(key, 0) + 1
    if unseen:
        listed = ", ".join(f"{label!r} ({count} row{'s' if count > 1 else ''})" for label, count in unseen.items())
        raise ValueError(
            f"The {column!r} column (label_column) of the transfer rows ({where}) holds labels the training split "
            f"(train_split={args.train_split!r}) never has: {listed}; the classes are {names}. Pass "
            "--transfer_ignore_labels true to use those rows without their labels, or fix the data."
        )
    labelled = [i for i, key in enumerate(keys) if key is not None]
    if isinstance(feature, datasets.ClassLabel) and list(feature.names) != list(names):
        # Ids of another class order: spelled out, so they are encoded by name like the training split's.
        spelled = extra.features.copy()
        spelled[column] = datasets.Value("string")
        extra = extra.map(
            lambda batch: {column: [None if _missing(v, feature) else feature.int2str(int(v)) for v in batch[column]]},
            batched=True,
            features=spelled,
        )
    if labelled:
        rows.labelled.append(extra.select(labelled))
    rest = [i for i, key in enumerate(keys) if key is None]
    if rest:
        rows.transfer.append(extra.select(rest))
        rows.sources[f"{source} without a label"] = len(rest)


def _transfer_key(value, feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return feature.int2str(int(value))
    return _label_key(value)


def _cap_transfer(rows: TrainingRows, cap: int | None, seed: int) -> None:
    """max_transfer_samples: a seeded choice among all transfer rows, each part keeping its chosen rows in order."""
    total = rows.transfer_count
    if cap is None or total <= cap:
        return
    chosen = np.sort(np.random.default_rng(seed).permutation(total)[:cap])
    parts, sources, start = [], {}, 0
    for part, source in zip(rows.transfer, list(rows.sources), strict=True):
        mine = chosen[(chosen >= start) & (chosen < start + len(part))] - start
        start += len(part)
        if len(mine):
            parts.append(part.select(mine.tolist()))
            sources[source] = len(mine)
    rows.transfer, rows.sources, rows.capped_from = parts, sources, total


def label_names(train: datasets.Dataset, held_out: datasets.Dataset, args: DataArguments) -> list[str]:
    """Class names: from a ClassLabel feature, else the sorted distinct values of the training split (at least 2).

    Only the training split makes classes: a label seen only in the held-out split would add a class that no
    training row teaches, whose rows are always wrong (see `drop_unseen_eval_labels`)."""
    _require_columns(train, {"label_column": args.label_column})
    _require_columns(held_out, {"label_column": args.label_column})
    feature = train.features[args.label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        values = sorted(set(train.unique(args.label_column)), key=str)
        names = list(dict.fromkeys(_label_key(v) for v in values))
    if len(names) < 2:
        # One label would give num_labels=1, which transformers treats as regression: a meaningless "accuracy".
        raise ValueError(
            f"The {args.label_column!r} column (label_column) holds a single class {names}: a classifier needs at "
            "least 2. Check label_column, or the data files and max_train_samples."
        )
    return names


def drop_unseen_eval_labels(
    held_out: datasets.Dataset, names: list[str], args: DataArguments
) -> tuple[datasets.Dataset, str | None]:
    """Held-out rows whose label is not among the training split's classes (`names`): refused, or dropped with a
    warning when `unseen_eval_labels='drop'`. Returns the held-out split and a note for the card (None: none)."""
    column = args.label_column
    if isinstance(held_out.features[column], datasets.ClassLabel):
        return held_out, None  # ids into the declared classes, which `names` lists whole
    known = set(names)
    if all(_label_key(v) in known for v in held_out.unique(column)):
        return held_out, None
    counts: dict[str, int] = {}
    for value in held_out[column]:
        key = _label_key(value)
        if key not in known:
            counts[key] = counts.get(key, 0) + 1
    split = (
        f"the held-out split (eval_split={args.eval_split!r})"
        if args.eval_split
        else f"the held-out {args.eval_fraction:.0%} carved from train_split={args.train_split!r}"
    )
    listed = ", ".join(f"{label!r} ({count} row{'s' if count > 1 else ''})" for label, count in counts.items())
    if args.unseen_eval_labels == "error":
        raise ValueError(
            f"The {column!r} column (label_column) of {split} holds labels the training split "
            f"(train_split={args.train_split!r}) never has: {listed}. The classes come from the training rows, so "
            f"no model can predict these and each such row counts as wrong. Fix the data (or max_train_samples), or "
            "pass --unseen_eval_labels drop to leave those rows out of the evaluation (the card says how many)."
        )
    kept = held_out.filter(
        lambda batch: [_label_key(v) in known for v in batch[column]], batched=True, desc="Dropping unseen labels"
    )
    note = (
        f"{sum(counts.values())} held-out rows whose {column!r} label never occurs in training ({listed}) were "
        "dropped (unseen_eval_labels=drop)"
    )
    logger.warning("%s.", note)
    if len(kept) == 0:
        raise ValueError(f"{note}, which leaves no held-out row. Check eval_split and label_column.")
    return kept, note


def _label_ids(dataset: datasets.Dataset, args: DataArguments, names: list[str]) -> datasets.Dataset:
    """The label column as `labels`, class ids in the order of `names` (the teacher's own order when it is not
    fine-tuned here, which may list the classes differently from the data)."""
    feature = dataset.features[args.label_column]
    if isinstance(feature, datasets.ClassLabel) and list(feature.names) == list(names):
        return dataset.rename_column(args.label_column, "labels") if args.label_column != "labels" else dataset
    if isinstance(feature, datasets.ClassLabel):
        # The same classes in another order: each id is mapped through its name, or the labels would be swapped.
        index = {name: i for i, name in enumerate(names)}
        new_ids = [index[name] for name in feature.names]
        features = dataset.features.copy()
        del features[args.label_column]
        features["labels"] = datasets.ClassLabel(names=list(names))
        return dataset.map(
            lambda batch: {"labels": [new_ids[v] if v >= 0 else v for v in batch[args.label_column]]},
            batched=True,
            remove_columns=[args.label_column],
            features=features,
            desc="Encoding labels",
        )
    index = {name: i for i, name in enumerate(names)}
    return dataset.map(
        lambda batch: {"labels": [index[_label_key(v)] for v in batch[args.label_column]]},
        batched=True,
        desc="Encoding labels",
    )


def _without_labels(dataset) -> datasets.Dataset:
    """Transfer rows: every label -100 (in a `labels` column of ints, as the labelled rows' ids)."""
    dataset = dataset.remove_columns([c for c in ("labels",) if c in dataset.column_names])
    return dataset.add_column("labels", [IGNORE_INDEX] * len(dataset))


def _labelled_text_rows(dataset, args: DataArguments, names: list[str], unlabelled: bool = False):
    """The rows that hold both a text and a label, with the labels as class ids; with `unlabelled` (transfer rows),
    those that hold a text, each labelled -100."""
    if unlabelled:
        columns = {"text_column": args.text_column, "text_pair_column": args.text_pair_column}
        _require_columns(dataset, columns)
        dataset = dataset.filter(lambda row: row[args.text_column] is not None)
        if len(dataset) == 0:
            raise ValueError(f"No transfer row has a {args.text_column!r} text (text_column); check the data.")
        dropped = [args.label_column] if args.label_column in dataset.column_names else []
        return _without_labels(dataset.remove_columns(dropped))
    _require_columns(
        dataset,
        {
            "text_column": args.text_column,
            "text_pair_column": args.text_pair_column,
            "label_column": args.label_column,
        },
    )
    dataset = dataset.filter(lambda row: row[args.text_column] is not None and row[args.label_column] is not None)
    if len(dataset) == 0:
        raise ValueError(
            f"No row has both a {args.text_column!r} text (text_column) and a {args.label_column!r} label "
            "(label_column): the data set is empty once rows missing either are dropped. Check the two columns."
        )
    dataset = _label_ids(dataset, args, names)
    return dataset


def preprocess_text_classification(
    dataset, tokenizer, args: DataArguments, names: list[str], unlabelled: bool = False, keep_text: bool = False
):
    """Tokenized rows with class ids in `labels` (-100 for every row with `unlabelled`: transfer rows); `keep_text`:
    the text columns stay too (word augmentations, which tokenize each augmented batch again: hfkd.augment)."""
    dataset = _labelled_text_rows(dataset, args, names, unlabelled)

    def tokenize(batch):
        pair = batch[args.text_pair_column] if args.text_pair_column else None
        return tokenizer(batch[args.text_column], pair, truncation=True, max_length=args.max_length)

    keep = {"labels"} | ({args.text_column, args.text_pair_column} - {None} if keep_text else set())
    return dataset.map(
        tokenize,
        batched=True,
        remove_columns=[c for c in dataset.column_names if c not in keep],
        desc="Tokenizing",
    )


def preprocess_image_classification(dataset, image_processor, args: DataArguments, names: list[str], unlabelled=False):
    """Pixel values with class ids in `labels` (-100 for every row with `unlabelled`: transfer rows)."""
    if unlabelled:
        _require_columns(dataset, {"image_column": args.image_column})
        dropped = [args.label_column] if args.label_column in dataset.column_names else []
        dataset = _without_labels(dataset.remove_columns(dropped))
    else:
        _require_columns(dataset, {"image_column": args.image_column, "label_column": args.label_column})
        dataset = _label_ids(dataset, args, names)

    def transform(batch):
        images = [
            image.convert("RGB") if image.mode not in ("RGB", "L") else image for image in batch[args.image_column]
        ]
        out = image_processor(images, return_tensors="np")
        return {"pixel_values": list(out["pixel_values"]), "labels": batch["labels"]}

    return dataset.map(
        transform,
        batched=True,
        batch_size=256,
        remove_columns=[c for c in dataset.column_names if c != "labels"],
        desc="Preprocessing images",
    ).with_format("torch")


def preprocess_causal_lm(dataset, tokenizer, args: DataArguments):
    """Tokenises and packs the text into blocks of `max_length` tokens (as transformers' run_clm does)."""
    _require_columns(dataset, {"text_column": args.text_column})
    block = args.max_length
    tokenized = dataset.map(
        lambda batch: tokenizer([t for t in batch[args.text_column] if t]),
        batched=True,
        remove_columns=dataset.column_names,
        desc="Tokenizing",
    )

    def pack(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        usable = (len(ids) // block) * block
        blocks = [ids[i : i + block] for i in range(0, usable, block)]
        return {
            "input_ids": blocks,
            "attention_mask": [[1] * block for _ in blocks],
            "labels": [list(b) for b in blocks],
        }

    packed = tokenized.map(
        pack, batched=True, remove_columns=tokenized.column_names, desc=f"Packing {block}-token blocks"
    )
    if len(packed) == 0:
        raise ValueError(f"The text is shorter than one block of max_length={block} tokens; lower max_length.")
    return packed


# ---------------------------------------------------------------------------------------------------- cross-modal
def _missing_values(dataset: datasets.Dataset, column: str) -> int:
    """Rows of `dataset` (after any select or split) without a value in `column`, read from Arrow."""
    return dataset.select_columns([column]).with_format("arrow")[:][column].null_count


def paired_rows(dataset, args: DataArguments, names: list[str], unlabelled: bool = False):
    """Rows of a text and its audio (cross-modal distillation, hfkd.cross_modal): the text column(s), the audio column
    and class ids in `labels` (-100 for every row with `unlabelled`: transfer rows). A row missing either modality is
    refused, naming the field that declares its column."""
    columns = {"text_column": args.text_column, "text_pair_column": args.text_pair_column}
    _require_columns(dataset, {**columns, "audio_column": args.audio_column})
    for field_name, column in {**columns, "audio_column": args.audio_column}.items():
        missing = _missing_values(dataset, column) if column else 0
        if missing:
            raise ValueError(
                f"{missing} of {len(dataset)} rows have no value in the {column!r} column ({field_name}): each row "
                "must hold both modalities, the teacher's text and the student's audio. Drop those rows from the "
                f"data, or set {field_name} to the column that holds them."
            )
    # Labels are encoded without the audio, which a row-wise pass would copy out of Arrow for nothing; no row is
    # dropped there (texts were checked above, labels before), so the audio column is put back beside as it is.
    text = [c for c in (args.text_column, args.text_pair_column) if c]
    labelled = _labelled_text_rows(dataset.remove_columns(args.audio_column), args, names, unlabelled)
    if len(labelled) != len(dataset):
        raise ValueError(
            f"{len(dataset) - len(labelled)} rows have no {args.label_column!r} label (label_column); drop them, or "
            "make them transfer rows."
        )
    audio = dataset.select_columns([args.audio_column]).flatten_indices()
    both = datasets.concatenate_datasets([labelled.select_columns([*text, "labels"]).flatten_indices(), audio], axis=1)
    return both.select_columns([*text, args.audio_column, "labels"])


def preprocess_audio(dataset, feature_extractor, args: DataArguments):
    """`paired_rows` as the student alone reads them: its feature extractor's inputs (e.g. `input_features`) and
    `labels`."""

    def extract(batch):
        arrays = [np.asarray(a, dtype=np.float32) for a in batch[args.audio_column]]
        out = feature_extractor(arrays, sampling_rate=args.audio_sampling_rate)
        return {**{k: list(v) for k, v in out.items()}, "labels": batch["labels"]}

    return dataset.map(
        extract,
        batched=True,
        batch_size=64,
        remove_columns=dataset.column_names,
        desc="Extracting the student's audio features",
    ).with_format("numpy")


# ---------------------------------------------------------------------------------------------------- two tokenizers
def _special_count(tokenizer) -> int:
    """Tokens the tokenizer adds to a text on its own (BOS, EOS, CLS, SEP)."""
    return len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])


def split_text(texts: list[str], tokenizers: list, max_length: int) -> list[str]:
    """Cuts each text at whitespace into pieces that every tokenizer holds in at most `max_length` tokens.

    The counterpart of packing when a teacher and a student do not share a tokenizer: blocks of one tokenizer's
    tokens end mid-word for the other, whereas a piece of text is the same text for both. Whitespace at a cut is
    dropped; a run of text without whitespace longer than the budget is cut where the budget ends. Empty texts give
    no piece. Each piece is measured in the context of the whole text, so a rare piece tokenized alone may exceed the
    budget by a token (tokenizing with truncation catches it).
    """
    tokenizers = list(tokenizers)
    budgets = [max(max_length - _special_count(t) - 1, 1) for t in tokenizers]
    pieces = []
    for text in texts:
        if not text or not text.strip():
            continue
        ends = []  # per tokenizer, where each of its tokens ends in the text
        for tokenizer in tokenizers:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ends.append([end for start, end in encoded["offset_mapping"] if start < end])
        start = len(text) - len(text.lstrip())
        while start < len(text):
            limit = len(text)
            for token_ends, budget in zip(ends, budgets, strict=True):
                first = bisect.bisect_right(token_ends, start)  # the first token that ends past `start`
                if first + budget - 1 < len(token_ends):
                    limit = min(limit, token_ends[first + budget - 1])
            cut = limit
            if limit < len(text):
                space = max(text.rfind(c, start + 1, limit + 1) for c in (" ", "\n", "\t", "\r"))
                cut = space if space > start else limit
            piece = text[start:cut].strip()
            if piece:
                pieces.append(piece)
            start = cut
            while start < len(text) and text[start].isspace():
                start += 1
    return pieces


def preprocess_text_classification_for_both(
    dataset,
    student_tokenizer,
    teacher_tokenizer,
    args: DataArguments,
    names: list[str],
    unlabelled: bool = False,
    keep_text: bool = False,
):
    """Text classification rows tokenized for a student and a teacher with their own tokenizers
    (hfkd.two_tokenizers.tokenize_for_both, each side cut to max_length tokens), with the spans between them
    (`unlabelled`: transfer rows, labelled -100; `keep_text`: the text columns stay too, for word augmentations,
    hfkd.augment)."""
    from .two_tokenizers import tokenize_for_both

    dataset = _labelled_text_rows(dataset, args, names, unlabelled)
    return dataset.map(
        tokenize_for_both,
        fn_kwargs={
            "student_tokenizer": student_tokenizer,
            "teacher_tokenizer": teacher_tokenizer,
            "max_length": args.max_length,
            "text_column": args.text_column,
            "text_pair_column": args.text_pair_column,
        },
        remove_columns=[
            c
            for c in dataset.column_names
            if c != "labels" and not (keep_text and c in (args.text_column, args.text_pair_column))
        ],
        desc="Tokenizing for the student and the teacher",
    )


def preprocess_causal_lm_for_both(dataset, student_tokenizer, teacher_tokenizer, args: DataArguments):
    """Causal-LM rows for a student and a teacher with their own tokenizers: the text is cut at whitespace into
    pieces both hold in max_length tokens (`split_text`, in place of packing), each piece one row tokenized for both
    (hfkd.two_tokenizers.tokenize_for_both) and padded in the batch; the labels are the student's ids."""
    from .two_tokenizers import tokenize_for_both

    _require_columns(dataset, {"text_column": args.text_column})
    tokenizers = [student_tokenizer, teacher_tokenizer]
    column = args.text_column
    pieces = dataset.map(
        lambda batch: {column: split_text(batch[column], tokenizers, args.max_length)},
        batched=True,
        remove_columns=dataset.column_names,
        desc=f"Cutting the text into pieces of at most {args.max_length} tokens for both tokenizers",
    )
    rows = pieces.map(
        tokenize_for_both,
        fn_kwargs={
            "student_tokenizer": student_tokenizer,
            "teacher_tokenizer": teacher_tokenizer,
            "max_length": args.max_length,
            "text_column": column,
            "causal_lm": True,
        },
        remove_columns=[column],
        desc="Tokenizing for the student and the teacher",
    )
    # A row of one token on either side predicts nothing there.
    rows = rows.filter(lambda row: len(row["input_ids"]) > 1 and len(row["teacher_input_ids"]) > 1)
    if len(rows) == 0:
        raise ValueError(f"No text row holds two tokens or more (text_column={column!r}); check the data.")
    return rows


# ---------------------------------------------------------------------------------------------------- prompt + completion
def tokenize_prompt_completion(example: dict, tokenizer, max_length: int | None = None, add_eos: bool = True) -> dict:
    """One row of TRL-style data as causal-LM inputs whose labels are -100 on the prompt (`dataset.map(...)`).

    The rows on-policy distillation and sequence-level KD read their prompts from (hfkd.on_policy), and supervised KD
    on the completions alone. Columns, as TRL names them:

    - `prompt` and `completion` texts: the completion continues the prompt's text as is (give it its leading
      space); `add_eos` appends the tokenizer's EOS so that the student learns to stop.
    - `messages`, a conversation (`[{"role": ..., "content": ...}, ...]`) whose last message is the assistant's
      answer: the prompt is the tokenizer's chat template over the others with the generation prompt (the assistant
      header), the completion the rest of the whole conversation's template. `prompt` and `completion` may be such
      message lists too.

    Texts are tokenized whole (prompt + completion) and split where they stop agreeing with the prompt alone, so a
    token that merges across the boundary belongs to the completion (with a warning). `max_length` cuts rows from the
    right, the completion first.

    Example:
        ```python
        train = train.map(tokenize_prompt_completion, fn_kwargs={"tokenizer": tok}, remove_columns=train.column_names)
        trainer = DistillationTrainer(..., train_dataset=train, data_collator=completion_collator(tok))
        ```

    Returns:
        {"input_ids", "attention_mask", "labels"}, lists of ints.
    """
    if "messages" in example:
        messages = list(example["messages"])
        if not messages or messages[-1].get("role") != "assistant":
            roles = [m.get("role") for m in messages]
            raise ValueError(
                f"A `messages` row must end with the assistant's answer (the completion), got roles {roles}; drop "
                "rows without one, or give `prompt` and `completion` columns."
            )
        prompt, completion = messages[:-1], messages[-1:]
    elif "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
    else:
        raise ValueError(
            f"tokenize_prompt_completion needs `prompt` and `completion` columns or a `messages` column, got "
            f"{sorted(example)}."
        )
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("`prompt` and `completion` must both be texts or both be lists of messages.")
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = list(tokenizer(prompt + completion)["input_ids"])
        eos = getattr(tokenizer, "eos_token_id", None)
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
    else:  # conversational: the chat template writes the turns, their special tokens and end-of-turn markers
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"Conversational rows (messages) need the tokenizer's chat template, but {type(tokenizer).__name__} "
                "has none (tokenizer.chat_template is unset): use the instruct model's tokenizer, set "
                "tokenizer.chat_template, or give `prompt` and `completion` texts."
            )
        prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids = list(tokenizer(whole, add_special_tokens=False)["input_ids"])
    shared = 0
    while shared < min(len(prompt_ids), len(ids)) and prompt_ids[shared] == ids[shared]:
        shared += 1
    if shared < len(prompt_ids):
        logger.warning(
            "The tokenized prompt is not a prefix of the tokenized prompt + completion (a token merges across the "
            "boundary, or the chat template renders the prompt otherwise): its last %d tokens count as completion.",
            len(prompt_ids) - shared,
        )
    if max_length is not None:
        ids = ids[:max_length]
    labels = [-100] * min(shared, len(ids)) + ids[shared:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def completion_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """The collator for `tokenize_prompt_completion` rows: transformers' `DataCollatorForSeq2Seq`, which pads
    `input_ids` with the pad token, `attention_mask` with 0 and `labels` with -100 on the tokenizer's padding side
    (and whose output hfkd's data checks can predict from the columns). Training rows must start at position 0, so
    the tokenizer must pad on the right (generation pads prompts on the left by itself)."""
    from transformers import DataCollatorForSeq2Seq

    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            "The tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token (padding "
            "positions are masked)."
        )
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError(
            f"The tokenizer pads on the {tokenizer.padding_side}; training rows must start at position 0 (the models "
            "number positions from there): set tokenizer.padding_side = 'right'."
        )
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of)
