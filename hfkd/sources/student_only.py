"""No teacher: every configured term reads the student alone (self-distillation through auxiliary heads, `byot`).

The terms are built under the one name "teacher" as usual and read an empty teacher side; nothing runs for it. The
data and probe checks take the student's own limits for both sides, so they still run.
"""

from __future__ import annotations

import torch

from .. import checks
from ..models import unwrap_peft
from .base import TeacherSource, Teaching


class StudentOnly(TeacherSource):
    """The source of a run without a teacher, chosen by `build_source` when no term reads one."""

    described_as = "a run without a teacher (terms that read the student alone)"

    def __init__(self, student: torch.nn.Module | None):
        self.student = student

    def check_terms(self, term_set) -> None:
        readers = [name for name, term in term_set.terms.items() if term.reads_teacher]
        if readers:
            raise ValueError(
                f"The terms {readers} read a teacher, but this run has none; pass teacher_model= (or another "
                "teacher source), or drop them (logit_weight=0 for the logit term)."
            )

    def limits(self) -> dict[str, checks.ModelLimits]:
        if self.student is None:
            return {}
        return {"teacher": checks.model_limits(unwrap_peft(self.student), "student")}

    def outputs(self, batch, teacher_inputs, flags, training, head=None, **kwargs) -> Teaching:
        return Teaching({"teacher": None})

    def fingerprint(self, multi: bool) -> dict:
        return {"teacher": {"class": "none (the student alone)"}}
