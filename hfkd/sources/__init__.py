"""Where the teachers' outputs come from: one object each behind `TeacherSource` (see base.py).

- `FrozenTeachers` (frozen.py): one or several teacher models;
- `CachedTeachers` (cached.py): the teacher cache, with the teacher models for evaluation when given;
- `MeanTeacher` (ema.py): an exponential moving average of the student;
- `Peers` (peers.py): deep mutual learning, peers that train too;
- `StudentOnly` (student_only.py): no teacher, when every term reads the student alone (`byot`).

`build_source` reads the trainer's arguments and returns the one source of a run. A new source is one file here and
one branch in `build_source`.
"""

from ..cache import TeacherCache
from ..names import named_teachers
from ..terms import TERMS
from .base import TeacherSource, Teaching
from .cached import CachedTeachers, named_caches
from .ema import MeanTeacher
from .frozen import FrozenTeachers, load_teachers
from .peers import Peers, load_peers
from .student_only import StudentOnly

__all__ = [
    "CachedTeachers",
    "FrozenTeachers",
    "MeanTeacher",
    "Peers",
    "StudentOnly",
    "Teaching",
    "TeacherSource",
    "build_source",
]


def build_source(model, args, teacher_model=None, peer_models=None) -> TeacherSource:
    """The teacher source a `DistillationTrainer(model, args, teacher_model=, peer_models=)` asks for, checked; every
    error here comes before Trainer creates output_dir."""
    peers = load_peers(model, args, peer_models, teacher_model)
    teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
    if args.teacher_ema_decay is not None:
        if teacher is not None:
            raise ValueError(
                "teacher_ema_decay makes the teacher a moving average of the student: pass no teacher_model (or "
                "unset teacher_ema_decay to distil from this teacher)."
            )
        if model is None:
            raise ValueError("teacher_ema_decay needs the student (`model=`) to start the teacher from.")
    elif teacher is None and not args.teacher_cache_dir and not peers and not _student_alone(args):
        own = [spec.name for spec in args.term_specs if not TERMS[spec.name].reads_teacher]
        readers = [spec.name for spec in args.term_specs if TERMS[spec.name].reads_teacher]
        raise ValueError(
            "DistillationTrainer needs a teacher: pass `teacher_model=` (a model, Hub id or path), set "
            "`teacher_model_name_or_path` in DistillationConfig, give a teacher cache (`teacher_cache_dir`), set "
            "`teacher_ema_decay` for a mean teacher made from the student, or pass `peer_models=` (or "
            "`peer_model_name_or_path`) for deep mutual learning with peers instead of a teacher"
            + (
                f". The terms {own} read the student alone, but {readers} read a teacher: drop those (logit_weight=0 "
                "for the logit term) to train without one."
                if own
                else "."
            )
        )
    teachers = named_teachers(teacher) if teacher is not None else {}
    if args.teacher_ema_decay is not None:
        teachers = {"teacher": None}  # the mean teacher: made from the student below
    caches = named_caches(args.teacher_cache_dir, list(teachers)) if args.teacher_cache_dir else {}
    count = max(len(teachers), len(caches), len(peers))
    if count < 2 and args.teacher_combine != "weights":
        raise ValueError(
            f"teacher_combine={args.teacher_combine!r} combines several teachers, but there is one; give "
            "teacher_model a list or dict of teachers, or leave teacher_combine at 'weights'."
        )
    if count < 2 and args.teacher_weights is not None:
        raise ValueError("teacher_weights weighs several teachers, but there is one; unset teacher_weights.")
    caches = {name: TeacherCache(path) for name, path in caches.items()}
    for cache in caches.values():
        cache.check_config(args)
    if peers:
        return Peers(peers)
    if not teachers and not caches:
        return StudentOnly(model)  # every term reads the student alone: no teacher to load
    online = None
    if args.teacher_ema_decay is not None:
        online = MeanTeacher(model, args.teacher_ema_decay)
    elif teachers:
        online = FrozenTeachers(*load_teachers(teachers, model, args.teacher_model_init_kwargs))
    return CachedTeachers(caches, online) if caches else online


def _student_alone(args) -> bool:
    """Every configured term reads the student alone (`Term.reads_teacher` is False): the run needs no teacher."""
    return bool(args.term_specs) and not args.reads_teacher
