"""Data-free distillation: a teacher and no training data.

- `deep_inversion` (deepinversion.py, Yin et al. 2020): images synthesised from a teacher with batch normalisation,
  matching its layers' running statistics; `synthesized_dataset` / `save_synthesized` (output.py) write them as a
  `datasets` folder that recipes read as transfer rows (`hfkd synthesize` on the command line, command.py), and
  `transfer_rows` reads one back for `DistillationTrainer`.
- `adversarial_distill` (adversarial.py, Fang et al. 2019 / Micaelli & Storkey 2019): a generator seeks inputs where
  student and teacher disagree and the student learns on them; any image classifier can teach (no batch norm needed).
- `ImageSpace` (image_space.py): the teacher's normalised input space and the way back to 0-255 pixels.

Example:
    ```python
    from hfkd.synthesis import DeepInversionConfig, ImageSpace, deep_inversion, synthesized_dataset

    space = ImageSpace(channels=1, height=28, width=28, mean=(0.286,), std=(0.353,))
    images = deep_inversion(teacher, DeepInversionConfig(num_images=2560), space)
    synthesized_dataset(images.pixel_values, images.targets, space).save_to_disk("synthesised")
    ```
"""

from .adversarial import AdversarialConfig, AdversarialResult, Generator, adversarial_distill, discrepancy
from .deepinversion import (
    DeepInversionConfig,
    Synthesized,
    batch_norm_layers,
    batch_norm_statistics_loss,
    deep_inversion,
    l2_prior,
    total_variation,
)
from .image_space import ImageSpace
from .output import save_synthesized, synthesized_dataset, transfer_rows

__all__ = [
    "AdversarialConfig",
    "AdversarialResult",
    "DeepInversionConfig",
    "Generator",
    "ImageSpace",
    "Synthesized",
    "adversarial_distill",
    "batch_norm_layers",
    "batch_norm_statistics_loss",
    "deep_inversion",
    "discrepancy",
    "l2_prior",
    "save_synthesized",
    "synthesized_dataset",
    "total_variation",
    "transfer_rows",
]
