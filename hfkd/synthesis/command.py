"""`hfkd synthesize`: synthesise a transfer set from a teacher alone and write it as a `datasets` folder.

    hfkd synthesize --teacher outputs/teacher --num_images 2560 --output_dir outputs/synthesised
    hfkd distill --config recipe.yaml --transfer_data_files outputs/synthesised

Only DeepInversion writes a data set. The adversarial generator (hfkd.synthesis.adversarial_distill) is a training
loop whose images are made for the student of the moment, so it is offered from Python, where the student is given;
`--method adversarial` is refused with that reason. Every refusal (arguments, output folder, a teacher without batch
normalisation) comes before anything is written.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from ..paths import resolve_path
from .deepinversion import DeepInversionConfig, batch_norm_layers, deep_inversion
from .image_space import ImageSpace
from .output import SETTINGS_FILE, check_output_dir, save_synthesized, synthesized_dataset

logger = logging.getLogger(__name__)

METHODS = ("deepinversion", "adversarial")


@dataclass
class SynthesisArguments:
    """What `hfkd synthesize` reads and writes (DeepInversionConfig holds how it synthesises)."""

    teacher: str = field(
        default=None,
        metadata={
            "help": "The teacher: a folder or Hub id of an image classifier (AutoModelForImageClassification) with "
            "BatchNorm layers, e.g. a ResNet. 'pkg:<package>/<path>' points inside an installed package."
        },
    )
    output_dir: str = field(
        default=None, metadata={"help": "New folder for the data set (datasets.save_to_disk) and hfkd_synthesis.json."}
    )
    method: str = field(
        default="deepinversion",
        metadata={
            "help": "'deepinversion' (Yin et al. 2020). 'adversarial' trains a student instead of writing data: use "
            "hfkd.synthesis.adversarial_distill from Python.",
            "choices": list(METHODS),
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an existing output_dir (only once the new data set is complete)."},
    )
    image_processor_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "For a teacher folder without preprocessor_config.json: a JSON object of ViTImageProcessor "
            "settings (size, image_mean, image_std), the same as the recipe's, so that the images map back to the "
            "tensors that were synthesised."
        },
    )
    device: str | None = field(default=None, metadata={"help": "Where to run, e.g. 'cpu' (default: cuda if any)."})

    def __post_init__(self):
        if not self.teacher:
            raise ValueError("teacher is required: --teacher <folder or Hub id of an image classifier>.")
        if not self.output_dir:
            raise ValueError("output_dir is required: --output_dir <new folder for the data set>.")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        if self.method == "adversarial":
            raise ValueError(
                "method='adversarial' writes no data set: its generator makes images for the student it trains against, "
                "so it is a training loop with a student, not a transfer set for any student. Run it from Python with "
                "hfkd.synthesis.adversarial_distill(teacher, student, AdversarialConfig(), space) (README, "
                "'Data-free distillation'), or use --method deepinversion."
            )


def image_processor(teacher_path: str, kwargs_json: str | None):
    """The processor a recipe would read the teacher's images with (hfkd.recipe.data._image_processor's rule): the
    folder's own, else a Hub teacher's, else ViTImageProcessor(image_processor_kwargs)."""
    import transformers
    from transformers import AutoImageProcessor

    if os.path.isfile(os.path.join(teacher_path, "preprocessor_config.json")):
        return AutoImageProcessor.from_pretrained(teacher_path)
    if not os.path.isdir(teacher_path) and kwargs_json is None:
        return AutoImageProcessor.from_pretrained(teacher_path)
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"image_processor_kwargs must be a JSON object: {err}") from err
    if not isinstance(kwargs, dict):
        raise ValueError(f"image_processor_kwargs must be a JSON object, got {kwargs_json!r}.")
    processor_cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    return processor_cls(**kwargs)


def load_image_teacher(name_or_path: str):
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load teacher={name_or_path!r} as an image classifier (AutoModelForImageClassification): {err}"
        ) from err


def run_synthesis(args: SynthesisArguments, config: DeepInversionConfig) -> dict:
    """Synthesises and writes the data set; returns the settings written to hfkd_synthesis.json."""
    import torch

    check_output_dir(args.output_dir, args.overwrite)
    path = resolve_path(args.teacher)
    teacher = load_image_teacher(path)
    layers = batch_norm_layers(teacher)  # refuses a teacher without batch normalisation, naming what applies
    space = ImageSpace.from_processor(image_processor(path, args.image_processor_kwargs), teacher.config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device)
    logger.info(
        "DeepInversion of %s (%d BatchNorm layers): %d images of %s in %d batches of %d iterations, on %s.",
        args.teacher,
        len(layers),
        config.num_images,
        "x".join(map(str, space.shape)),
        -(-config.num_images // config.batch_size),
        config.iterations,
        device,
    )
    started = time.perf_counter()
    result = deep_inversion(teacher, config, space)
    id2label = getattr(teacher.config, "id2label", None) or {}
    names = [str(id2label.get(i, i)) for i in range(result.record["num_classes"])] if id2label else None
    dataset = synthesized_dataset(result.pixel_values, result.targets, space, names)
    from .. import __version__

    settings = {
        "hfkd_version": __version__,
        "teacher": args.teacher,
        "arguments": asdict(args),
        "rows": len(dataset),
        "columns": dataset.column_names,
        **result.record,
        "seconds": round(time.perf_counter() - started, 2),
    }
    save_synthesized(dataset, args.output_dir, settings, overwrite=args.overwrite)
    logger.info("Wrote %d images and %s to %s.", len(dataset), SETTINGS_FILE, args.output_dir)
    return settings
