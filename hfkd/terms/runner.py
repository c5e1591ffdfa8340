"""The trainer's side of the configured terms: one module that owns them all, their hooks and their state.

Holding every term in one `nn.Module` is what lets the optimizer, gradient clipping, DDP and checkpoints treat their
parameters and buffers (projections, embedding heads, memory banks) at once, and keeps them out of the student.
"""

import contextlib
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..batch import ROW_COLUMN  # the column the trainer adds to carry each row's index through shuffling
from .base import TERMS, Features, Needs, Term, TermBatch, TermSpec, build_term

TERMS_FILE = "hfkd_terms.safetensors"
ROW_IDS_KEY = "hfkd_row_ids"  # batch key: each row's index in train_dataset (never given to a model)


class RowIdCollator:
    """Wraps a collator: rows carrying `hfkd_row` come out as a `hfkd_row_ids` tensor beside the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        rows = None
        if features and isinstance(features[0], dict) and ROW_COLUMN in features[0]:
            rows = torch.tensor([int(f[ROW_COLUMN]) for f in features], dtype=torch.long)
            features = [{k: v for k, v in f.items() if k != ROW_COLUMN} for f in features]
        batch = self.collator(features)
        if rows is not None:
            batch = dict(batch)
            batch[ROW_IDS_KEY] = rows
        return batch


class TermSet(nn.Module):
    """The terms of `DistillationConfig.terms`, by name, with their weights.

    With one teacher each term is one instance under its name. With several (`teachers`), each term has one instance
    per teacher under `<name>/<teacher>` (its own projections and heads), and a response term (one that reads only
    logits) also one under `<name>` that reads the combined teacher (hfkd.mixing).
    """

    def __init__(self, specs: list[TermSpec], teachers: tuple[str, ...] = ("teacher",)):
        super().__init__()
        self.specs = list(specs)
        self.teachers = tuple(teachers)
        self.weights = {spec.name: spec.weight for spec in self.specs}
        self._units = {spec.name: build_term(spec).unit for spec in self.specs}
        own = [spec.name for spec in self.specs if not TERMS[spec.name].reads_teacher]
        if own and len(self.teachers) > 1:
            # Each term is built once per teacher: a term that reads none would train one copy of its state per
            # teacher, each against the same student.
            raise ValueError(
                f"The terms {own} read the student alone, but there are {len(self.teachers)} teachers "
                f"({', '.join(self.teachers)}), and each term is built once per teacher. Train them with one teacher "
                "or none, or drop them."
            )
        if len(self.teachers) == 1:
            self.terms = nn.ModuleDict({spec.name: build_term(spec) for spec in self.specs})
        else:
            self.terms = nn.ModuleDict(
                {f"{spec.name}/{t}": build_term(spec) for spec in self.specs for t in self.teachers}
            )
        self.response: set[str] = set()  # specs computed against the combined teacher (set in bind_module_names)
        self._needs: Needs | None = None

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def multi(self) -> bool:
        return len(self.teachers) > 1

    def unit_of(self, key: str) -> str:
        return self._units[key.split("/")[0]]

    def _instances(self, teacher: str):
        """(spec name, instance) of one teacher."""
        for spec in self.specs:
            yield spec.name, self.terms[f"{spec.name}/{teacher}" if self.multi else spec.name]

    def instances_of(self, teacher: str) -> list[Term]:
        """The terms that read this teacher (one per configured term)."""
        return [term for _, term in self._instances(teacher)]

    def needs(self) -> Needs:
        # Read every step (hooks, output flags): merged once, after the module names are bound.
        if self._needs is None:
            needs = Needs()
            for term in self.terms.values():
                needs = needs.merge(term.needs())
            self._needs = needs
        return self._needs

    def teacher_modules(self, teacher: str) -> tuple[str, ...]:
        """The submodules of this teacher that its terms read."""
        names: tuple[str, ...] = ()
        for _, term in self._instances(teacher):
            names += tuple(n for n in term.needs().teacher_modules if n not in names)
        return names

    def bind_module_names(self, student: tuple[str, ...], teachers: dict[str, tuple[str, ...]]) -> None:
        """`teachers`: each teacher's module names (`{"teacher": names}` with one teacher)."""
        for teacher in self.teachers:
            for _, term in self._instances(teacher):
                term.bind_module_names(student, teachers.get(teacher, ()))
        if self.multi:
            for spec in self.specs:
                if spec.name not in self.feature_terms():
                    self.response.add(spec.name)
                    if spec.name not in self.terms:
                        self.terms[spec.name] = build_term(spec)  # against the combined teacher
                        self.terms[spec.name].bind_module_names(student, ())
        self._needs = None  # a term's needs may follow the names it was given

    def feature_terms(self) -> list[str]:
        """The configured terms that read more than the models' logits (hidden states, attentions, submodules):
        the others are response terms. Known once the module names are bound."""
        names = []
        for spec in self.specs:
            needs = self._first(spec.name).needs()
            reads_features = needs.hidden_states or needs.attentions or needs.teacher_modules or needs.student_modules
            if reads_features or not needs.logits:
                names.append(spec.name)
        return names

    def _first(self, name: str) -> Term:
        return self.terms[f"{name}/{self.teachers[0]}" if self.multi else name]

    def flags(self) -> dict[str, bool]:
        """`output_*` flags both models' forwards need for these terms."""
        needs, flags = self.needs(), {}
        if needs.hidden_states:
            flags["output_hidden_states"] = True
        if needs.attentions:
            flags["output_attentions"] = True
        return flags

    def setup(
        self,
        student: Features,
        teachers: dict[str, Features],
        batch: TermBatch,
        mixed: dict[str, Features] | None = None,
    ) -> None:
        """`mixed`: the combined teacher each response term reads, by term name (hfkd.mixing.TeacherMixer)."""
        for teacher in self.teachers:
            for _, term in self._instances(teacher):
                term.setup(student, teachers[teacher], batch)
        for name in self.response:
            self.terms[name].setup(student, mixed[name], batch)

    def forward(
        self,
        student: Features,
        teachers: dict[str, Features],
        batch: TermBatch,
        skip: str | None = None,
        mixed: dict[str, Features] | None = None,
        teacher_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each term's value: `<name>` (what the loss uses) and, with several teachers, `<name>/<teacher>` too.

        One call for every term, so that a DDP wrapper around this module sees each parameter used in the step.
        `skip`: the head term, when the trainer computed it on the output heads by chunks (it has no parameters).
        `teacher_weights` `[K]`: how the per-teacher values of the non-response terms combine.
        """
        if not self.multi:
            teacher = teachers[self.teachers[0]]
            return {name: term(student, teacher, batch) for name, term in self.terms.items() if name != skip}
        values = {}
        for spec in self.specs:
            name = spec.name
            per_teacher = []
            for k, teacher in enumerate(self.teachers):
                term = self.terms[f"{name}/{teacher}"]
                if name in self.response:
                    with torch.no_grad():  # logged only: the loss reads the combined teacher
                        value = term(student, teachers[teacher], batch)
                else:
                    value = term(student, teachers[teacher], batch)
                    per_teacher.append(teacher_weights[k] * value)
                values[f"{name}/{teacher}"] = value
            values[name] = self.terms[name](student, mixed[name], batch) if name in self.response else sum(per_teacher)
        return values

    def reads_teacher(self) -> bool:
        """Whether any term reads a teacher (False: the student teaches itself, hfkd.sources.StudentOnly)."""
        return any(TERMS[spec.name].reads_teacher for spec in self.specs)

    def save_beside_student(self, directory: str) -> list[str]:
        """Each term's files for the saved student (`Term.save_beside_student`), written into its folder; their names."""
        return [name for term in self.terms.values() for name in term.save_beside_student(directory)]

    def has_state(self) -> bool:
        return any(True for _ in self.parameters()) or any(True for _ in self.buffers())

    def save(self, directory: str) -> None:
        if not self.has_state():
            return
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        layout = {name: list(tensor.shape) for name, tensor in state.items()}
        save_file(state, os.path.join(directory, TERMS_FILE), metadata={"layout": json.dumps(layout)})

    def load(self, directory: str) -> None:
        if not self.has_state():
            return
        path = os.path.join(directory, TERMS_FILE)
        state = load_file(path) if os.path.isfile(path) else {}
        mine = self.state_dict()
        for name, term in self.terms.items():
            prefix = f"terms.{name}."
            if any(key.startswith(prefix) and key not in state for key in mine):
                legacy = term.legacy_state(directory)  # a checkpoint from before the term saved here
                state.update({prefix + key: value for key, value in (legacy or {}).items()})
        if not state:
            raise ValueError(
                f"{directory} holds no {TERMS_FILE}, but this run's terms ({', '.join(self.terms)}) have trainable "
                "state: the checkpoint comes from a run with other terms or models, or was cut short while saving. "
                "Resume from another checkpoint or start without resume_from_checkpoint."
            )
        if {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(v.shape) for k, v in mine.items()}:
            raise ValueError(
                f"The term state in {path} ({sorted(state)}) does not match this run's terms ({sorted(mine)}); the "
                "checkpoint was made with other terms or models."
            )
        self.load_state_dict({k: v.to(mine[k].device) for k, v in state.items()})

    def head_term(self) -> tuple[str, Term] | None:
        """The term that can run on the models' output heads chunk by chunk (`Term.head_chunk_size`), when no other
        term needs the full logits (they would be computed anyway) and there is one teacher; else None."""
        if self.multi:
            return None
        chunked = [(name, term) for name, term in self.terms.items() if term.head_chunk_size() > 0]
        if len(chunked) != 1:
            return None
        others = [term for name, term in self.terms.items() if name != chunked[0][0]]
        return None if any(term.needs().logits for term in others) else chunked[0]


def resolve_modules(model: nn.Module | None, names: tuple[str, ...], side: str) -> dict[str, nn.Module]:
    """The submodules the terms named, found once (the trainer keeps them; a step only hooks them)."""
    if model is None or not names:
        return {}
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            close = [n for n in modules if n.endswith(name.split(".")[-1])][:5]
            raise ValueError(
                f"The {side} has no submodule named {name!r}; names come from model.named_modules(), e.g. {close}."
            )
    return {name: modules[name] for name in names}


@contextlib.contextmanager
def capture_modules(modules: dict[str, nn.Module]):
    """Records the outputs of these submodules during the forwards inside the block."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, _n=name: captured.__setitem__(_n, out))
        for name, module in modules.items()
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def with_row_ids(dataset, collator, term_set: TermSet):
    """(`dataset` with each row's index in a column, a collator that hands it to the terms as `ROW_IDS_KEY`), for
    terms that keep a memory per training row (such as CRD)."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        names = [n for n, t in term_set.terms.items() if t.needs().row_ids]
        raise ValueError(
            f"The terms {names} keep a memory per training row, so they need a datasets.Dataset train_dataset "
            f"(got {type(dataset).__name__}); convert it with datasets.Dataset.from_list or drop them."
        )
    if ROW_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    if hasattr(collator, "row_ids_key"):
        # A teacher cache's collator already reads (and removes) each row's index to fetch its outputs: it hands the
        # index on too, instead of a second wrapper that would take it away first.
        collator.row_ids_key = ROW_IDS_KEY
        return dataset, collator
    return dataset, RowIdCollator(collator)
