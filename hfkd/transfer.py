"""Transfer rows: rows without a label, which train on the distillation terms alone.

A row whose label is -100 (or None in a `datasets` label column) has no target: it adds nothing to the task loss or
to the terms that read labels (dkd), whose values are means over the labelled rows of the accumulation window
(hfkd.units, unit `labelled`), and it counts like any other row for every other term. Collators cannot stack a
None (and a torch-formatted data set turns it into NaN, making the whole label column float), so the trainer wraps
its collator in `MissingLabelCollator` when a label column holds missing values; other data sets give -100.
"""

import math

import torch

from .batch import LABEL_KEYS

IGNORE_INDEX = -100


def missing_label_columns(dataset) -> dict[str, bool]:
    """The label columns of a `datasets.Dataset` (or a dict of them) that hold missing values, each with whether
    its labels are one class id per row (an integer or all-missing column; False: lists, floats, anything else).

    Read from the stored Arrow table without a pass over the rows (`null_count`): for a data set made by
    select/split that is a superset of its rows, which at worst wraps a collator that then has nothing to fill.
    """
    if isinstance(dataset, dict):
        found: dict[str, bool] = {}
        for value in dataset.values():
            for column, per_row in missing_label_columns(value).items():
                found[column] = found.get(column, True) and per_row
        return found
    try:
        import datasets
        import pyarrow as pa
    except ImportError:  # pragma: no cover - dependencies
        return {}
    if not isinstance(dataset, datasets.Dataset):
        return {}
    found = {}
    for column in (c for c in LABEL_KEYS if c in dataset.data.column_names):
        array = dataset.data.column(column)
        kind = array.type
        if pa.types.is_null(kind):
            found[column] = True
        elif array.null_count > 0:
            found[column] = pa.types.is_integer(kind)
    return found


def _filled(value):
    """-100 for a missing label (None, or NaN), else the class id as an int."""
    if value is None:
        return IGNORE_INDEX
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return value
        value = value.item()
    if isinstance(value, float):
        return IGNORE_INDEX if math.isnan(value) else int(value)
    return value


class MissingLabelCollator:
    """Wraps a collator: in `columns`, a missing label (None, or the NaN a torch-formatted data set makes of it)
    becomes -100 and every other label an int class id, before the wrapped collator stacks them."""

    def __init__(self, collator, columns):
        self.collator = collator
        self.columns = tuple(columns)

    def __call__(self, features):
        if features and isinstance(features[0], dict):
            features = [
                {**f, **{c: _filled(f[c]) for c in self.columns if c in f}} if isinstance(f, dict) else f
                for f in features
            ]
        return self.collator(features)
