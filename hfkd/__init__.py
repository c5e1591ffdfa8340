"""hfkd: knowledge distillation for the Hugging Face stack.

`DistillationTrainer` is a drop-in for `transformers.Trainer` that also learns from a teacher;
`DistillationConfig` is its `TrainingArguments`; `student_from_teacher` builds a smaller student from a teacher's
own layers.
"""

from .config import DistillationConfig
from .student import student_from_teacher
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = ["DistillationConfig", "DistillationTrainer", "student_from_teacher", "__version__"]
