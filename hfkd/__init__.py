"""hfkd: knowledge distillation for the Hugging Face stack.

`DistillationTrainer` is a drop-in for `transformers.Trainer` that also learns from a teacher;
`DistillationConfig` is its `TrainingArguments`; `student_from_teacher` builds a smaller student from a teacher's
own layers; `build_teacher_cache` runs a teacher once and stores its outputs for cached training;
`TwoTokenizerCollator` / `tokenize_for_both` give a teacher with its own tokenizer its tokens, and
`CrossModalCollator` a teacher of another modality (text, audio, images) its own columns through its own processor;
`bits_per_byte` compares language models whose tokenizers differ. `register_term` adds a distillation term of
your own (a subclass of `Term` that declares its `Needs` and reads `Features` from a `TermBatch`).
"""

import importlib

__version__ = "0.1.0"

# Each public name and the module that defines it. They load on first use (PEP 562), so that `import hfkd.cli`
# (the `hfkd` command, its --help) does not import torch and transformers before a command runs.
_EXPORTS = {
    "CrossModalCollator": ".cross_modal",
    "DistillationConfig": ".config",
    "DistillationTrainer": ".trainer",
    "Features": ".terms",
    "Needs": ".terms",
    "TeacherCache": ".cache",
    "Term": ".terms",
    "TermBatch": ".terms",
    "TwoTokenizerCollator": ".two_tokenizers",
    "bits_per_byte": ".lm_eval",
    "build_teacher_cache": ".cache",
    "register_term": ".terms",
    "student_from_teacher": ".student",
    "tokenize_for_both": ".two_tokenizers",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hfkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
