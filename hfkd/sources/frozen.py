"""Frozen teachers: one model, or several mixed per example (hfkd.mixing), each run without gradients."""

from __future__ import annotations

import torch

from .. import checks
from ..fingerprint import model_fingerprint
from ..heads import accepts_logits_to_keep, base_module, capture_last_hidden, linear_head
from ..models import (
    call_model,
    check_teacher_head,
    ensure_eager_attention,
    forward_keywords,
    load_teacher_with_info,
    prepare_teacher,
    unwrap_peft,
)
from ..sharding import gathered
from ..two_tokenizers import check_same_tokenizer
from .base import TeacherSource, Teaching


def load_teachers(teachers: dict, student, init_kwargs) -> tuple[dict, dict]:
    """Loads the teachers given by Hub id or path and checks each: ({name: model}, {name: (source, loading info)})."""
    teachers, loaded = dict(teachers), {}
    for name, one in teachers.items():
        checks.check_teacher_argument(one)
        if isinstance(one, str):
            source = one
            one, info = load_teacher_with_info(source, student, init_kwargs)
            teachers[name], loaded[name] = one, (source, info)
        if one is student:
            raise ValueError(
                "teacher_model is the student itself; for self-distillation pass a frozen copy, or set "
                "teacher_ema_decay for a teacher that is a moving average of the student."
            )
    return teachers, loaded


class FrozenTeachers(TeacherSource):
    """Teachers that are models, frozen and in eval mode: each batch runs their forwards (no gradients).

    `loaded`: the teachers loaded here by name, with transformers' loading record, whose heads are checked."""

    def __init__(self, teachers: dict[str, torch.nn.Module], loaded: dict | None = None):
        self.teachers = dict(teachers)
        self.names = tuple(teachers)
        self.loaded = loaded or {}
        self._accelerator = None
        self._accepts_use_cache = {
            name: "use_cache" in forward_keywords(unwrap_peft(one))[0] for name, one in teachers.items()
        }

    def _role(self, name: str) -> str:
        return "teacher" if len(self.teachers) == 1 else f"teacher {name!r}"

    def _unwrapped(self, one: torch.nn.Module) -> torch.nn.Module:
        return self._accelerator.unwrap_model(one) if self._accelerator is not None else one

    # ---------------------------------------------------------------- set-up and checks
    def check_tokenizers(self, student_tokenizer, student) -> None:
        for name, teacher in self.teachers.items():
            check_same_tokenizer(student_tokenizer, student, teacher, self._role(name))

    def check_terms(self, term_set) -> None:
        # A teacher loaded here by name whose head transformers initialised at random teaches noise through the
        # terms that read its logits. (A teacher passed as a model carries no such record: it may have been trained
        # since it was loaded.)
        for name, (source, info) in self.loaded.items():
            readers = [
                spec.name
                for spec, term in zip(term_set.specs, term_set.instances_of(name), strict=True)
                if term.needs().logits and term.reads_teacher
            ]
            check_teacher_head(self.teachers[name], info, source, readers, self._role(name))
        if term_set.needs().attentions:
            for name, one in self.teachers.items():
                ensure_eager_attention(one, self._role(name))

    def attach(self, trainer) -> None:
        self._accelerator = trainer.accelerator
        self.teachers = {name: prepare_teacher(one, trainer.accelerator) for name, one in self.teachers.items()}

    def limits(self) -> dict[str, checks.ModelLimits]:
        role = "teacher" if len(self.teachers) == 1 else "teacher {!r}"
        return {
            name: checks.model_limits(self._unwrapped(one), role.format(name)) for name, one in self.teachers.items()
        }

    def module_names(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(n for n, _ in unwrap_peft(one).named_modules()) for name, one in self.teachers.items()}

    def model(self, name: str) -> torch.nn.Module | None:
        return self.teachers.get(name)

    def models(self) -> dict[str, torch.nn.Module]:
        return dict(self.teachers)

    def head_parts(self) -> list[torch.nn.Module] | None:
        if len(self.teachers) != 1:
            return None
        model = unwrap_peft(self._unwrapped(next(iter(self.teachers.values()))))
        parts = [base_module(model), linear_head(model)]
        return parts if all(p is not None for p in parts) and accepts_logits_to_keep(model) else None

    # ---------------------------------------------------------------- the step
    def forward(self, name: str, teacher_inputs: dict, flags: dict, **extra):
        kwargs = {**flags, **extra}
        if self._accepts_use_cache[name]:
            kwargs["use_cache"] = False  # a KV cache is dead weight in a single forward
        with torch.no_grad():
            return call_model(self.teachers[name], teacher_inputs, kwargs)

    def outputs(self, batch, teacher_inputs, flags, training, head=None, **kwargs) -> Teaching:
        if head is None:
            return Teaching({name: self.forward(name, teacher_inputs, flags) for name in self.teachers})
        # The chunked head term reads the teacher's final hidden states; its logits are computed for one position.
        (name,) = self.teachers
        with capture_last_hidden(head.teacher_base) as last:
            out = self.forward(name, teacher_inputs, flags, logits_to_keep=1)
        return Teaching({name: out}, head_inputs={name: last.value})

    def whole_head(self):
        return gathered(self.teachers.values())

    def serves_head(self, batch, head) -> bool:
        return head.teacher_base is not None

    def fingerprint(self, multi: bool) -> dict:
        if multi:
            return {"teachers": {n: model_fingerprint(self._unwrapped(t)) for n, t in self.teachers.items()}}
        return {"teacher": model_fingerprint(self._unwrapped(next(iter(self.teachers.values()))))}
