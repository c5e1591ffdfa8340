"""The teacher cache (hfkd.cache): each training row's teacher outputs, stored once by `hfkd cache`, read back.

Teachers given as models too (`teacher_model=` beside `teacher_cache_dir`) serve the batches that carry no cached
outputs: evaluation. Without them, evaluation reports the task loss only.
"""

from __future__ import annotations

import logging

from ..batch import ROW_COLUMN
from ..cache import CachedTeacherCollator, CachedTeacherOutput, TeacherCache, cached_prefix, has_cached_outputs
from ..errors import TeacherCacheError
from ..names import named_teachers
from .base import TeacherSource, Teaching
from .frozen import FrozenTeachers

logger = logging.getLogger(__name__)


def named_caches(value, teachers: list[str]) -> dict[str, str]:
    """`teacher_cache_dir` as {teacher name: folder}: one folder for one teacher; a list in teacher order or a dict by
    teacher name for several (one cache per teacher, each built by `hfkd cache` for that teacher)."""
    if isinstance(value, str):
        if len(teachers) > 1:
            raise ValueError(
                f"teacher_cache_dir is one folder, but there are {len(teachers)} teachers ({teachers}) and a cache holds "
                "one teacher's outputs: give one cache per teacher, as a list in teacher order or a dict by name."
            )
        return {teachers[0] if teachers else "teacher": value}
    caches = named_teachers(value)  # names a list teacher0, teacher1, ... like the teachers; refuses repeats
    if teachers and isinstance(value, (list, tuple)):
        if len(value) != len(teachers):
            raise ValueError(
                f"teacher_cache_dir lists {len(value)} caches for {len(teachers)} teachers ({teachers}); give one per "
                "teacher, in the same order."
            )
        caches = dict(zip(teachers, value, strict=True))
    if teachers and set(caches) != set(teachers):
        missing = sorted(set(teachers) - set(caches))
        raise ValueError(
            f"teacher_cache_dir has caches for {sorted(caches)}, but the teachers are {teachers}"
            f"{f' (no cache for {missing})' if missing else ''}; give one cache per teacher, by name."
        )
    return caches


class CachedTeachers(TeacherSource):
    """Each teacher's cache by name; `online`: the same teachers as models, for batches without cached outputs."""

    described_as = "a teacher cache (teacher_cache_dir)"

    def __init__(self, caches: dict[str, TeacherCache], online: FrozenTeachers | None = None):
        self.caches = caches
        self.names = tuple(caches)
        self.online = online

    def check_tokenizers(self, student_tokenizer, student) -> None:
        if self.online is not None:
            self.online.check_tokenizers(student_tokenizer, student)

    def check_terms(self, term_set) -> None:
        if self.online is not None:
            self.online.check_terms(term_set)
        for name, cache in self.caches.items():
            for term in term_set.instances_of(name):
                term.check_cache(cache)  # each term says whether a cache can serve it, or names what it lacks

    def attach(self, trainer) -> None:
        if self.online is not None:
            self.online.attach(trainer)

    def prepare_data(self, trainer) -> None:
        """Checks each cache against this run and routes the training rows' cached outputs into their batches."""
        if trainer.train_dataset is None:
            raise ValueError("teacher_cache_dir is set but there is no train_dataset to read it for.")
        for name, cache in self.caches.items():
            teacher = self.online.model(name) if self.online is not None else None
            unwrapped = trainer.accelerator.unwrap_model(teacher) if teacher is not None else None
            cache.check_run(trainer.train_dataset, trainer.data_collator, unwrapped, trainer.processing_class)
        # Rows carry their index through shuffling and sampling; the collator fetches their cached outputs.
        trainer.train_dataset = trainer.train_dataset.add_column(ROW_COLUMN, list(range(len(trainer.train_dataset))))
        trainer.data_collator = CachedTeacherCollator(trainer.data_collator, self.caches)
        if trainer.eval_dataset is not None and self.online is None:
            logger.warning(
                "Training reads the teacher cache and no teacher was given: evaluation reports the task loss only "
                "(pass teacher_model= as well to evaluate the distillation terms)."
            )

    def limits(self):
        if self.online is not None:
            return self.online.limits()
        return {name: cache.teacher_limits() for name, cache in self.caches.items()}

    def module_names(self):
        return self.online.module_names() if self.online is not None else {}

    def model(self, name):
        return self.online.model(name) if self.online is not None else None

    def models(self):
        return self.online.models() if self.online is not None else {}

    def head_parts(self):
        # The probe reads the cache: the head term reads the cached logits, a batch without them the full logits
        # (a teacher given too is not checked, so its head is not used); no head at all stops chunking, as online.
        if self.online is not None and self.online.head_parts() is None:
            return None
        return []

    def check_probe_outputs(self, term_set, student, teachers) -> None:
        """Every teacher hidden state a term reads must be in the teacher cache (checked on the probe batch)."""
        for name, side in teachers.items():
            if isinstance(side.outputs, CachedTeacherOutput):
                _check_cached_layers(term_set, student, side, name)

    def outputs(self, batch, teacher_inputs, flags, training, head=None, **kwargs):
        if not has_cached_outputs(batch):
            if self.online is not None:
                return self.online.outputs(batch, teacher_inputs, flags, training, head=head)
            if training:
                raise TeacherCacheError(
                    "A training batch came without cached teacher outputs and there is no teacher."
                )
            return None
        if len(self.caches) == 1:
            (name, cache), prefix = next(iter(self.caches.items())), cached_prefix()
            outputs = {name: CachedTeacherOutput(batch, cache, prefix)}
        else:
            outputs = {n: CachedTeacherOutput(batch, c, cached_prefix(n)) for n, c in self.caches.items()}
        # The chunked head term reads the cached logits directly (a top-k cache holds no hidden states to project).
        return Teaching(outputs, head_inputs=dict(outputs) if head is not None else {})

    def whole_head(self):
        # Every process enters the online teacher's (a collective when it is sharded), cached batch or not.
        return self.online.whole_head() if self.online is not None else super().whole_head()

    def serves_head(self, batch, head) -> bool:
        if has_cached_outputs(batch):
            return True
        return self.online is not None and self.online.serves_head(batch, head)

    def fingerprint(self, multi: bool) -> dict:
        stored = {
            name: {k: v for k, v in c.teacher.items() if k != "weights_sha256"} for name, c in self.caches.items()
        }
        if multi:
            teachers = self.online.fingerprint(True)["teachers"] if self.online is not None else {}
            for name, value in stored.items():  # a cache stands for a teacher not given
                teachers.setdefault(name, value)
            return {"teachers": teachers}
        if self.online is not None:
            return self.online.fingerprint(False)
        return {"teacher": next(iter(stored.values()))}


def _check_cached_layers(term_set, student, teacher, teacher_name: str) -> None:
    stored, s_states = teacher.hidden_states, student.hidden_states
    if stored is None or s_states is None:
        return  # the term's own setup names what is missing
    held = [i for i, state in enumerate(stored) if state is not None]
    for term in term_set.instances_of(teacher_name):
        if not term.needs().hidden_states:
            continue
        wanted = term.teacher_hidden_layers(len(s_states), len(stored))
        missing = sorted(set(wanted) - set(held)) if wanted is not None else ["?"]
        if missing:
            raise TeacherCacheError(
                f"The term {term.name!r} reads teacher hidden_states[{missing[0]}], but the teacher cache holds "
                f"{held}; rebuild it with `hfkd cache` for this student and these terms."
            )
