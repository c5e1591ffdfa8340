"""What a distillation term is: a module that reads both models' features and returns one value.

A term declares what it needs from each model (`Needs`), may own trainable parts and buffers (it is an
`nn.Module`: the trainer's optimizer, gradient clipping, DDP and checkpoints see them; the exported student never
does), and says what its value is normalised over (`unit`):

- `"tokens"`: the value is a sum over the positions the attention mask keeps; the trainer divides by their count
  over the whole accumulated batch (and all processes), so accumulation equals one big batch;
- `"examples"`: a sum over examples, divided likewise by the number of examples;
- `"logits"`: a sum over the positions the logit term counts (labels != -100, shifted for causal LMs; one per
  example for classification heads), divided by their count: for terms on the output distributions;
- `"labelled"`: a sum over the labelled units, for terms that read the labels (`Needs.labels`): for example-level
  heads the rows whose label is not -100 (rows without a label, transfer rows, give 0 and do not count), for
  token-level heads the positions the logit term counts. Divided by their count over the accumulated batch, as the
  task loss is;
- `"batch"`: a value of the micro-batch as a whole (relations between its examples, contrastive losses). The
  trainer averages it over the micro-batches of an accumulation window and over processes. Such a value depends on
  which examples share a micro-batch, so accumulation cannot equal one big batch exactly;
- `"mixed"`: a value made of parts with different units (e.g. one part per layer, over tokens for text and over
  examples for images); the term divides each part by its count in `TermBatch.counts` (the window's totals) itself.

Write one with `@register_term("name")` on a subclass whose `Options` is a dataclass of its settings; then
`DistillationConfig(terms=[{"name": "name", "weight": 1.0, <options>}])` uses it. A term never receives a model.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import TeacherCacheError
from ..streams import ModelKind, attention_streams, hidden_streams

UNITS = ("tokens", "examples", "logits", "labelled", "batch", "mixed")


@dataclass(frozen=True)
class Needs:
    """What a term reads from each model's forward.

    Attributes:
        logits: the output logits.
        hidden_states: every layer's hidden states (`output_hidden_states=True`).
        attentions: every layer's attention probabilities (`output_attentions=True`, eager attention).
        labels: the batch's labels.
        student_modules / teacher_modules: outputs of submodules by name (as in `model.named_modules()`), captured
            with forward hooks, e.g. `("encoder.layer.2.attention.self.query",)`.
        row_ids: each training row's index in `train_dataset` (`TermBatch.row_ids`; `TermBatch.num_rows` then gives
            the data set's size), for terms that keep a memory per row. Needs a `datasets.Dataset`.
    """

    logits: bool = False
    hidden_states: bool = False
    attentions: bool = False
    labels: bool = False
    student_modules: tuple[str, ...] = ()
    teacher_modules: tuple[str, ...] = ()
    row_ids: bool = False

    def merge(self, other: "Needs") -> "Needs":
        return Needs(
            logits=self.logits or other.logits,
            hidden_states=self.hidden_states or other.hidden_states,
            attentions=self.attentions or other.attentions,
            labels=self.labels or other.labels,
            student_modules=tuple(dict.fromkeys(self.student_modules + other.student_modules)),
            teacher_modules=tuple(dict.fromkeys(self.teacher_modules + other.teacher_modules)),
            row_ids=self.row_ids or other.row_ids,
        )


def logits_of(outputs: Any) -> torch.Tensor | None:
    """A model's logits: the `logits` field, or the output itself (a tensor), or its first entry (a tuple)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "logits"):
        value = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        return value
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    return None


@dataclass
class Features:
    """One model's side of a step: its outputs, the submodule outputs the terms asked for, and how it is shaped."""

    outputs: Any
    modules: dict[str, torch.Tensor]
    kind: ModelKind

    @property
    def logits(self) -> torch.Tensor | None:
        return logits_of(self.outputs)

    @property
    def hidden_states(self) -> tuple[torch.Tensor, ...] | None:
        """Hidden states of the main stream (the encoder's for encoder-decoders); index 0 = embeddings output."""
        streams = hidden_streams(self.outputs, self.kind) if not isinstance(self.outputs, torch.Tensor) else {}
        return streams.get("main", streams.get("encoder"))

    @property
    def attentions(self) -> tuple[torch.Tensor, ...] | None:
        streams = attention_streams(self.outputs, self.kind) if not isinstance(self.outputs, torch.Tensor) else {}
        return streams.get("main", streams.get("encoder"))


@dataclass
class TokenAlignment:
    """A teacher and a student with different tokenizers (hfkd.two_tokenizers): how their tokens line up.

    Attributes:
        student / teacher: `[batch, positions]` span id of each token on that side (-1: in no span; see
            hfkd.alignment.align_spans). Span ids are shared: span k of an example covers the same text on both sides.
        student_ids / teacher_ids: each side's `input_ids`.
        matched_student / matched_teacher: ids of the token strings both vocabularies hold, pairwise.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    matched_student: torch.Tensor | None = None
    matched_teacher: torch.Tensor | None = None


@dataclass
class TermBatch:
    """The batch as terms see it.

    Attributes:
        labels: the labels, or None.
        mask: `[batch, positions]` bool, the positions the attention mask keeps (None: no padding).
        num_examples: examples in this micro-batch.
        logit_mask: the positions the logit term counts (labels != -100, shifted for causal LMs), or None.
        row_ids: `[batch]` indices of the rows in train_dataset, for terms whose `needs().row_ids` (None in
            evaluation, or when no term asks).
        training: whether this is a training step (terms with memories update them only then).
        num_rows: rows in train_dataset, when row ids are given.
        masks: the positions that count per stream (`main`, or `encoder` and `decoder`), for the logits (`logit`)
            and, when the batch has labels, the labelled rows or positions (`labelled`, see hfkd.units.unit_masks);
            None where each example is one unit.
        counts: units behind each of `masks` (and `examples`) over the whole accumulation window and all processes
            (>= 1), for `unit = "mixed"` terms; in evaluation, over this batch. With two tokenizers, `spans` counts
            the spans.
        teacher_mask: the teacher's attention mask when it has its own tokenization (else None: `mask` fits both).
        alignment: the spans between the two tokenizations, or None when both models read the same tokens.
    """

    labels: torch.Tensor | None
    mask: torch.Tensor | None
    num_examples: int
    logit_mask: torch.Tensor | None = None
    row_ids: torch.Tensor | None = None
    training: bool = True
    num_rows: int | None = None
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_mask: torch.Tensor | None = None
    alignment: TokenAlignment | None = None


class Term(nn.Module):
    """Base class of distillation terms. Subclasses set `name`, `unit`, `Options` and implement `forward`.

    `needs()` says what both models must return; `setup(student, teacher, batch)` runs once on the probe batch
    (before the optimizer exists) and may create parameters; `forward(student, teacher, batch)` returns a 0-dim
    tensor: a sum over the term's units, or a batch value for `unit = "batch"`.
    """

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "examples"
    Options: ClassVar[type] = None
    # Built-in terms keep `DistillationConfig` fields as their short form: option (and "weight") -> field name.
    short_form: ClassVar[dict[str, str]] = {}
    # Whether the term works when the teacher has its own tokenizer (TermBatch.alignment): terms that compare
    # whole examples, or spans; not those that compare token positions one to one.
    across_tokenizers: ClassVar[bool] = False
    # Whether it works when the teacher and the student read different modalities (hfkd.cross_modal): terms that
    # compare each example's class distribution; not those that read positions or their features, which two
    # modalities do not share.
    across_modalities: ClassVar[bool] = False
    # Whether it compares logits over two different vocabularies (span_kd, uld) rather than class by class.
    across_vocabularies: ClassVar[bool] = False
    # Options that hfkd.search.kd_space searches besides the term's weight: option -> (low, high), log-uniform.
    # Only options whose best value the method's papers found to move with the data (DKD's beta and temperature).
    search_space: ClassVar[dict[str, tuple[float, float]]] = {}
    # Whether it reads a teacher at all. Terms that read the student alone (self-distillation through auxiliary heads,
    # `byot`) train without one: a run whose every term reads none needs no teacher (hfkd.sources.StudentOnly).
    reads_teacher: ClassVar[bool] = True

    def __init__(self, options=None):
        super().__init__()
        self.options = options if options is not None else self.Options()

    def bind_module_names(self, student: tuple[str, ...], teacher: tuple[str, ...]) -> None:
        """Called once, right after the terms are built and before `needs()` is first read, with the names of every
        submodule of each model (`named_modules()` of the unwrapped models, as the hooks see them; `()` without a
        teacher). Terms that find their `student_modules` / `teacher_modules` by name patterns resolve them here;
        the models themselves are never passed. Nothing by default."""

    def needs(self) -> Needs:
        return Needs()

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        """Checks shapes and builds parameters from real outputs (the probe batch); nothing by default."""

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        raise NotImplementedError

    def teacher_hidden_layers(self, num_student: int, num_teacher: int) -> list[int] | None:
        """The teacher `hidden_states` indices (>= 0) this term reads, given both models' numbers of entries, so that
        a teacher cache can store them; None: it reads none, or cannot say. By default the options decide when they
        can (`PooledFeatureOptions` can)."""
        layers = getattr(self.options, "teacher_hidden_layers", None)
        return layers(num_student, num_teacher) if callable(layers) else None

    def check_cache(self, cache) -> None:
        """Raises (naming the term) when a teacher cache (`hfkd.cache.TeacherCache`) cannot serve this term.

        A cache serves the teacher's full logits, and the hidden states of the layers the terms named when it was
        built (`teacher_hidden_layers`; the trainer checks the layers on the first batch). Terms that can read
        more (top-k logits) override this."""
        needs = self.needs()
        hidden_only = needs.hidden_states and not (needs.attentions or needs.teacher_modules)
        if hidden_only and cache.meta.get("hidden") is None:
            raise cache_error(
                f"The term {self.name!r} reads the teacher's hidden states, which the teacher cache does not hold; "
                "rebuild it with `hfkd cache` with this term configured, drop teacher_cache_dir (train with the "
                "teacher online) or drop the term."
            )
        if (needs.hidden_states and not hidden_only) or needs.attentions or needs.teacher_modules:
            what = "attentions" if needs.attentions else "submodules"
            raise cache_error(
                f"The term {self.name!r} reads the teacher's {what}, which the teacher cache does not hold for it; "
                "drop teacher_cache_dir (train with the teacher online) or the term."
            )
        if needs.logits and (cache.logits is None or cache.logits.get("mode") != "dense"):
            raise cache_error(
                f"The term {self.name!r} reads the teacher's full logits, but the cache holds "
                f"{'its top-k only' if cache.logits else 'no logits'}; rebuild it with `hfkd cache --top_k 0` "
                "(and a logit term), or drop the term."
            )

    def mixing(self) -> tuple[float, str]:
        """How several teachers' logits are mixed into the one teacher this response term reads (hfkd.mixing): its
        (temperature, divergence). By default the term's own `temperature` and `loss` options (1.0 and "kl" where it
        has none): the mixture is then the teacher distribution at the temperature the term compares at."""
        return float(getattr(self.options, "temperature", 1.0)), str(getattr(self.options, "loss", "kl"))

    def head_chunk_size(self) -> int:
        """Positions per chunk when this term can be computed from both models' final hidden states and linear
        output heads, a chunk at a time, instead of their full logits (see `head_loss`); 0: it cannot."""
        return 0

    def save_beside_student(self, directory: str) -> list[str]:
        """Writes what this term's state offers the saved student (files beside its weights, never inside them), each
        time the trainer saves the student, and returns their names: `byot` writes its exit heads there
        (hfkd.early_exit). Nothing by default."""
        return []

    def legacy_state(self, directory: str) -> dict[str, torch.Tensor] | None:
        """This term's state from a checkpoint written before terms saved theirs in `hfkd_terms.safetensors`
        (keys as in `state_dict()`), or None. Nothing by default."""
        return None


def cache_error(message: str) -> ValueError:
    """A `hfkd.cache.TeacherCacheError`, for terms that refuse what a teacher cache holds."""
    return TeacherCacheError(message)


@dataclass
class NoOptions:
    """This term has no options."""


TERMS: dict[str, type[Term]] = {}


def register_term(name: str) -> Callable[[type[Term]], type[Term]]:
    """Class decorator: registers a `Term` subclass under `name` (its `distill/<name>` log key and config name)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"A term needs a non-empty name without '/', got {name!r}.")

    def decorator(cls: type[Term]) -> type[Term]:
        if not (isinstance(cls, type) and issubclass(cls, Term)):
            raise TypeError(f"register_term({name!r}) decorates a subclass of hfkd.terms.Term, got {cls!r}.")
        if cls.unit not in UNITS:
            raise ValueError(f"Term {name!r} has unit {cls.unit!r}; choose one of {UNITS}.")
        if cls.Options is None:
            cls.Options = NoOptions
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"Term {name!r}: Options must be a dataclass of its settings.")
        previous = TERMS.get(name)
        if previous is not None and (previous.__module__, previous.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"A term named {name!r} is already registered ({previous.__qualname__}).")
        cls.name = name
        TERMS[name] = cls
        return cls

    return decorator


@dataclass
class TermSpec:
    """One entry of `DistillationConfig.terms`: which term, its weight and its options."""

    name: str
    weight: float = 1.0
    options: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "weight": self.weight, **self.options}


def parse_term_specs(value, field_name: str = "terms") -> list[TermSpec]:
    """Checks `terms` entries against the registry and each term's options; errors name the term and the option."""
    import json

    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f'{field_name} must be a JSON list of terms, e.g. \'[{{"name": "rkd", "weight": 1.0}}]\', got '
                f"{value!r} ({err})."
            ) from err
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field_name} must be a list of {{'name': ..., 'weight': ..., <options>}}, got {value!r}.")
    specs, seen = [], set()
    for entry in value:
        if isinstance(entry, TermSpec):
            entry = entry.as_dict()
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"Each entry of {field_name} needs a 'name', got {entry!r}.")
        entry = dict(entry)
        name = entry.pop("name")
        if name not in TERMS:
            raise ValueError(
                f"{field_name}: no term named {name!r}. Known terms: {sorted(TERMS)}; register your own with "
                "hfkd.register_term."
            )
        if name in seen:
            raise ValueError(f"{field_name}: the term {name!r} is given twice; give it once with all its options.")
        seen.add(name)
        weight = entry.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ValueError(f"{field_name}: {name}.weight must be a finite number >= 0, got {weight!r}.")
        options_cls = TERMS[name].Options
        valid = [f.name for f in dataclasses.fields(options_cls)]
        unknown = sorted(set(entry) - set(valid))
        if unknown:
            raise ValueError(
                f"{field_name}: term {name!r} has no option {unknown[0]!r}; its options are {valid or 'none'}."
            )
        try:
            options_cls(**entry)  # the options' own checks (__post_init__) run now, at config time
        except (TypeError, ValueError) as err:
            raise ValueError(f"{field_name}: term {name!r}: {err}") from err
        specs.append(TermSpec(name=name, weight=float(weight), options=entry))
    return specs


def build_term(spec: TermSpec) -> Term:
    cls = TERMS[spec.name]
    return cls(cls.Options(**spec.options))
