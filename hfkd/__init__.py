"""hfkd: knowledge distillation for the Hugging Face stack.

`DistillationTrainer` is a drop-in for `transformers.Trainer` that also learns from a teacher;
`DistillationConfig` is its `TrainingArguments`; `student_from_teacher` builds a smaller student from a teacher's
own layers; `build_teacher_cache` runs a teacher once and stores its outputs for cached training;
`TwoTokenizerCollator` / `tokenize_for_both` give a teacher with its own tokenizer its tokens;
`bits_per_byte` compares language models whose tokenizers differ.
"""

__version__ = "0.1.0"

from .cache import TeacherCache, build_teacher_cache  # noqa: E402
from .config import DistillationConfig  # noqa: E402
from .lm_eval import bits_per_byte  # noqa: E402
from .student import student_from_teacher  # noqa: E402
from .trainer import DistillationTrainer  # noqa: E402
from .two_tokenizers import TwoTokenizerCollator, tokenize_for_both  # noqa: E402

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "TeacherCache",
    "TwoTokenizerCollator",
    "bits_per_byte",
    "build_teacher_cache",
    "student_from_teacher",
    "tokenize_for_both",
    "__version__",
]
