"""Synthesised images as a `datasets` folder that a recipe reads as transfer rows, and back.

The folder is `Dataset.save_to_disk`'s (Arrow files, dataset_info.json, state.json) plus `hfkd_synthesis.json`, the
settings and record of the run that wrote it (the image space among them). Its columns:

- `image`: the images as 0-255 pixels (PIL, mode "L" or "RGB"). Recipes read image rows through the teacher's image
  processor (hfkd.data.preprocess_image_classification), so `hfkd distill ... --transfer_data_files <folder>` adds
  them as transfer rows, as it would any image data set; `transfer_rows` maps them back to `pixel_values` with the
  recorded image space, for training on tensors. Either way the tensors differ from the synthesised ones only by the
  rounding to whole pixels (at most 0.5 / 255 / std). The float tensors are not stored beside them: a recipe's data
  set would then hold two sources of `pixel_values`.
- `synthesis_target`: the class each image was synthesised for (a ClassLabel with the teacher's class names when
  its config has them). It is not called `label`: the rows teach through the teacher's outputs, and a recipe reads
  rows without its label column as transfer rows (no task loss).

A folder is written whole or not at all: into `<output_dir>.partial`, renamed to `output_dir` once complete; an
existing `output_dir` is replaced only with `overwrite` and only then.
"""

import json
import os
import shutil

import datasets
import numpy as np
import torch

from .image_space import ImageSpace

SETTINGS_FILE = "hfkd_synthesis.json"
IGNORE_INDEX = -100


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses an `output_dir` that exists and holds files, unless `overwrite`; called before any work starts."""
    if not output_dir:
        raise ValueError("output_dir is required: the folder to write the synthesised data set to.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir={output_dir!r} is a file; give a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(
            f"output_dir={output_dir!r} already exists and is not empty; choose another folder, or pass --overwrite "
            "true to replace it (it is replaced only once the new data set is complete)."
        )


def synthesized_dataset(
    pixel_values: torch.Tensor, targets: torch.Tensor, space: ImageSpace, class_names: list[str] | None = None
) -> datasets.Dataset:
    """The `image` and `synthesis_target` columns of synthesised images (module docstring)."""
    target = datasets.ClassLabel(names=list(class_names)) if class_names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "synthesis_target": target})
    rows = {"image": space.to_images(pixel_values), "synthesis_target": targets.tolist()}
    return datasets.Dataset.from_dict(rows, features=features)


def save_synthesized(dataset: datasets.Dataset, output_dir: str, settings: dict, overwrite: bool = False) -> str:
    """Writes `dataset` (save_to_disk) and `settings` (hfkd_synthesis.json) to `output_dir`, whole or not at all."""
    check_output_dir(output_dir, overwrite)
    partial = output_dir.rstrip("/") + ".partial"
    if os.path.exists(partial):  # left by a run that was killed before it could clean up
        shutil.rmtree(partial)
    try:
        dataset.save_to_disk(partial)
        with open(os.path.join(partial, SETTINGS_FILE), "w") as handle:
            json.dump(settings, handle, indent=1, default=str)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(partial, output_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output_dir


def transfer_rows(source, space: ImageSpace | None = None) -> datasets.Dataset:
    """A synthesised data set as transfer rows for `DistillationTrainer`: torch-formatted `pixel_values` (the images
    in the teacher's input space) and `labels` -100 (no label: the rows train on the distillation terms alone,
    hfkd.transfer).

    Args:
        source: a folder written by `hfkd synthesize` / `save_synthesized`, or such a Dataset.
        space: the teacher's input space; default: the one recorded in the folder's hfkd_synthesis.json.
    """
    if isinstance(source, (str, os.PathLike)):
        dataset = datasets.load_from_disk(str(source))
        settings_path = os.path.join(str(source), SETTINGS_FILE)
        if space is None and os.path.isfile(settings_path):
            with open(settings_path) as handle:
                space = ImageSpace.from_record(json.load(handle)["image_space"])
    else:
        dataset = source
    if space is None:
        raise ValueError(
            "transfer_rows needs the image space (space=ImageSpace(...)) of a data set without its folder."
        )
    if "image" not in dataset.column_names:
        raise ValueError(
            f"The synthesised data set has no image column (columns: {dataset.column_names}); give a folder written "
            "by `hfkd synthesize`."
        )
    pixels = np.stack([_pixels(image, space.channels) for image in dataset["image"]])
    pixel_values = space.from_uint8(pixels).numpy()
    features = datasets.Features(
        {"pixel_values": datasets.Array3D(shape=space.shape, dtype="float32"), "labels": datasets.Value("int64")}
    )
    rows = {"pixel_values": pixel_values, "labels": [IGNORE_INDEX] * len(pixel_values)}
    return datasets.Dataset.from_dict(rows, features=features).with_format("torch")


def _pixels(image, channels: int) -> np.ndarray:
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array
