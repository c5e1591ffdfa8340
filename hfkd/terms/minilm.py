"""MiniLMv2 multi-head self-attention relation distillation (Wang, Bao, Huang, Dong & Wei, "MiniLMv2: Multi-Head
Self-Attention Relation Distillation for Compressing Pretrained Transformers", Findings of ACL 2021).

For one teacher layer l and one student layer m, take the queries, keys and values of their self-attention: the
outputs of the q/k/v linear projections (captured by forward hooks), [batch, positions, width] with the attention
heads concatenated. Split the width into A_r relation heads of d_r = width / A_r each (A_{Q,l,a} is the a-th slice)
and form, per relation head a, the self-attention relations

    R_{QQ,a} = softmax(A_{Q,a} A_{Q,a}^T / sqrt(d_r)),  likewise R_{KK,a} from keys and R_{VV,a} from values,

each row a distribution over the positions (keys). The loss is

    L = sum_{(i) in {QQ, KK, VV}} alpha_i * 1 / (A_r |x|) * sum_a sum_t KL(R^T_{i,l,a,t} || R^S_{i,m,a,t})

with alpha_i = 1. Student and teacher share A_r but not d_r (each divides its own width), so their widths and
attention-head counts may differ freely; both widths must be divisible by `relation_heads`.

Padding: keys at padded positions are masked out of every softmax (probability 0 on both sides), and padded
positions never count as queries. Unit: tokens. The value is a sum over the query positions the attention mask
keeps of (1 / A_r) sum_a KL, summed over the relation types; the trainer divides by the number of kept positions
over the whole accumulated batch. Per example this is the paper's 1 / (A_r |x|) average; over a batch with unequal
lengths the positions are weighted equally (examples with more tokens weigh more), which equals the paper's
per-example mean whenever the lengths are equal. Without an attention mask each example counts as one unit worth
the mean over its positions.

Defaults. The number of relation heads A_r: MiniLMv2 used 48 for base-size teachers (width 768) and 64 for
large-size ones (width 1024), i.e. a teacher relation-head size d_r = width / A_r of 16 in both cases. A fixed
number cannot carry over to other widths (48 does not divide 384 x 2 / 3 = 256 wide students, 12 does not divide a
tiny model's 16 or 40), so the default is `relation_heads="auto"`: the largest A_r that divides every relation
width of both models (their greatest common divisor) and leaves the teacher's relation heads at least 16 wide,

    A_r = max { a : a divides gcd(widths), teacher query width / a >= 16 }    (1 if the teacher is narrower than 16)

which gives the paper's 48 for BERT-base and 64 for BERT-large / RoBERTa-large teachers, and 24 for a 384-wide
MiniLM teacher (auto_relation_heads). An explicit number (the paper's 48 or 64, or 12 as hfkd's earlier default)
is used as given, and setup() fails, naming `relation_heads`, when it does not divide a width.
The layers: the student's last layer (`student_layer=-1`); the teacher's last layer for base-size (12-layer)
teachers (`teacher_layer=-1`). For
large-size (24-layer) teachers the paper transfers an upper-middle layer instead of the last one (from its study
of which teacher layer to use); set `teacher_layer` to it (public reproductions use layer 19 of 24 for
RoBERTa-large, i.e. teacher_layer=18 here, 0-based). All three relation types with alpha = 1: the recommended `weight` is 1.0 (the
paper trains task-agnostically with this loss alone; when fine-tuning with a task loss beside it, tune it).
Layer indices are 0-based indices into the model's list of Transformer layers (not hidden_states indices);
negative ones count from the end (-1 is the last layer).

Which modules: per side, in this order,
1. explicit `student_modules` / `teacher_modules`: the [query, key, value] projection names from
   `model.named_modules()` (e.g. 'bert.encoder.layer.3.attention.self.query'); the layer option is then unused.
2. names detected from the model's module names (`bind_module_names`, see below): any module named
   `<prefix>encoder.layer.<i>.attention.self.query|key|value` (BERT, RoBERTa, ELECTRA, ...) or
   `<prefix>layers.<i>.self_attn.q_proj|k_proj|v_proj` (Llama, Mistral, Qwen2, Gemma, ...), restricted to
   `architecture` when given; the layer count comes from the names, so negative layers work.
3. `architecture` ('bert' or 'llama') alone: the names are built from ARCHITECTURES (the patterns as data, with the
   prefix of the models with a task head: 'bert.' for BertFor..., 'model.' for LlamaForCausalLM and
   LlamaForSequenceClassification). Without the model the layer count is unknown, so the layer must then be given
   as a non-negative index (e.g. teacher_layer=11, student_layer=5 for BERT-base -> 6 layers).
Step 2 needs the module names before `needs()` is read, which the current Term contract does not provide (needs()
is read before setup(), and no Term method sees the models). `bind_module_names(student_names, teacher_names)` is
written for a trainer that calls it right after building the terms; until then steps 1 and 3 apply.

Grouped-query attention (Llama with fewer key-value heads than query heads): the relations use the projection
outputs as they are, so the key and value relations are computed over num_kv_heads * head_dim features (narrower
than the queries'), which must be divisible by relation_heads too; keys and values are not repeated per query head.
For Llama the queries and keys are the projections' outputs, before the rotary position embedding (the paper's
BERT-style models have none). Fused q/k/v projections (GPT-2's c_attn, Phi-3's qkv_proj) are not supported.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..units import masked_sum
from .base import Features, Needs, Term, TermBatch, register_term

RELATIONS = ("qq", "kk", "vv")
AUTO = "auto"
MIN_RELATION_HEAD_SIZE = 16  # the teacher's d_r in MiniLMv2: 768 / 48 (base) and 1024 / 64 (large)
_PROJECTION = {"qq": 0, "kk": 1, "vv": 2}  # which of (query, key, value) each relation reads
SIDES = ("student", "teacher")


@dataclass(frozen=True)
class QKVPattern:
    """How a model family names its attention projections: `{prefix}{layers}.{i}.{attention}.{projection}`.

    `prefix` is that of the family's models with a task head (the base model's attribute name plus a dot).
    """

    prefix: str
    layers: str
    attention: str
    projections: tuple[str, str, str]  # query, key, value

    def names(self, layer: int, prefix: str | None = None) -> tuple[str, str, str]:
        prefix = self.prefix if prefix is None else prefix
        return tuple(f"{prefix}{self.layers}.{layer}.{self.attention}.{p}" for p in self.projections)

    def query_regex(self) -> re.Pattern:
        return re.compile(
            rf"^(?P<prefix>(?:.*\.)?){re.escape(self.layers)}\.(?P<layer>\d+)\.{re.escape(self.attention)}\."
            rf"{re.escape(self.projections[0])}$"
        )


ARCHITECTURES: dict[str, QKVPattern] = {
    "bert": QKVPattern("bert.", "encoder.layer", "attention.self", ("query", "key", "value")),
    "llama": QKVPattern("model.", "layers", "self_attn", ("q_proj", "k_proj", "v_proj")),
}


def auto_relation_heads(teacher_width: int, widths: Sequence[int]) -> int:
    """relation_heads="auto": the largest number of relation heads dividing every width in `widths` (both models'
    relation widths) with teacher_width / heads >= 16; 1 when none is (see the module docstring)."""
    common = math.gcd(*widths)
    fitting = [a for a in range(1, common + 1) if common % a == 0 and teacher_width // a >= MIN_RELATION_HEAD_SIZE]
    return max(fitting, default=1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_relations(value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"relations must be a non-empty list drawn from {list(RELATIONS)}, got {value!r}.")
    relations = []
    for item in value:
        name = item.strip().lower() if isinstance(item, str) else item
        if name not in RELATIONS:
            raise ValueError(f"relations={value!r}: {item!r} is not a relation; choose from {list(RELATIONS)}.")
        if name in relations:
            raise ValueError(f"relations={value!r} gives {name!r} twice.")
        relations.append(name)
    return tuple(relations)


def _parse_modules(value, field_name: str) -> tuple[str, str, str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(n, str) and n for n in value):
        raise ValueError(
            f"{field_name} must be the three submodule names [query, key, value] (from named_modules()), e.g. "
            f"['encoder.layer.5.attention.self.query', '...key', '...value'], got {value!r}."
        )
    return tuple(value)


@dataclass
class MiniLMOptions:
    """MiniLMv2 relation distillation (see the module docstring). Recommended weight: 1.0.

    Attributes:
        relation_heads: number of relation heads A_r, shared by both models, or "auto" (default: the largest
            number dividing every relation width that leaves the teacher's heads >= 16 wide; the paper's 48 for
            base-size and 64 for large-size teachers); a number must divide both widths (each relation's
            projection width).
        teacher_layer: the teacher's layer (0-based, negative from the end; paper: last for base-size teachers,
            an upper-middle one for large-size teachers).
        student_layer: the student's layer (paper: the last, -1).
        relations: which of 'qq', 'kk', 'vv' to sum (paper: all three, each with weight 1).
        architecture: 'bert' or 'llama': the family whose module-name patterns (ARCHITECTURES) locate the q/k/v
            projections; with the current trainer the layers must then be non-negative.
        student_modules / teacher_modules: explicit [query, key, value] submodule names, overriding the rest.
    """

    relation_heads: int | str = AUTO
    teacher_layer: int = -1
    student_layer: int = -1
    relations: list[str] = field(default_factory=lambda: list(RELATIONS))
    architecture: str | None = None
    student_modules: list[str] | None = None
    teacher_modules: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.relation_heads, str) and self.relation_heads.strip().lower() == AUTO:
            self.relation_heads = AUTO
        elif not _is_int(self.relation_heads) or self.relation_heads < 1:
            raise ValueError(
                f'relation_heads must be an integer >= 1 or "auto", got {self.relation_heads!r} (the paper: 48 for '
                "base-size teachers, 64 for large-size ones)."
            )
        for name in ("teacher_layer", "student_layer"):
            if not _is_int(getattr(self, name)):
                raise ValueError(
                    f"{name} must be an integer layer index (0-based, negative from the end), got "
                    f"{getattr(self, name)!r}."
                )
        _parse_relations(self.relations)
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not known; choose one of {list(ARCHITECTURES)}, or give "
                "student_modules and teacher_modules ([query, key, value] names) for other models."
            )
        _parse_modules(self.student_modules, "student_modules")
        _parse_modules(self.teacher_modules, "teacher_modules")


# ---------------------------------------------------------------------------------------------------- the loss
def _relation_scores(x: torch.Tensor, relation_heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """`[B, T, W]` projections -> `[B, A_r, T, T]` scores A A^T / sqrt(d_r) (float32 at least); keys at padding get
    the lowest score, so probability 0."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    b, t, width = x.shape
    if width % relation_heads:
        raise ValueError(f"width {width} is not divisible by relation_heads={relation_heads}.")
    d_r = width // relation_heads
    if mask is not None:  # zeros at padding: whatever a model leaves there (even NaN) cannot reach the loss
        x = x.masked_fill(~mask[..., None], 0.0)
    heads = x.reshape(b, t, relation_heads, d_r).transpose(1, 2)  # [B, A_r, T, d_r]
    # Scaled on the [T, d_r] side and masked by adding a per-key bias in place (its gradient is the identity): each
    # pass over [B, A_r, T, T] costs more than the product itself.
    scores = (heads * (1.0 / math.sqrt(d_r))) @ heads.transpose(-1, -2)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        scores.add_(bias.masked_fill_(~mask, torch.finfo(scores.dtype).min)[:, None, None, :])
    return scores


def relation_log_probs(x: torch.Tensor, relation_heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, T, W]` projections -> `[B, A_r, T, T]` log self-attention relations log softmax(A A^T / sqrt(d_r)).

    Keys at padded positions (`mask` False) get probability 0; the rows of padded queries are finite but
    meaningless. Computed in float32 at least.
    """
    return torch.log_softmax(_relation_scores(x, relation_heads, mask), dim=-1)


def relation_kl(
    student: torch.Tensor, teacher: torch.Tensor, relation_heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`[B, T, W_s]`, `[B, T, W_t]` -> `[B, T]`: per query position, (1 / A_r) sum_a KL(R_T || R_S) over the keys.

    Written as sum_k P log P (a constant, without gradients) - sum_k P log R_S, so that the autograd graph over the
    `[B, A_r, T, T]` relations holds only log R_S and one product (identical inputs still give exactly 0).
    """
    with torch.no_grad():  # the teacher's side is a constant of the loss
        scores = _relation_scores(teacher, relation_heads, mask)
        log_t, p_t = torch.log_softmax(scores, dim=-1), torch.softmax(scores, dim=-1)
        neg_entropy = (p_t * log_t).sum(-1)  # padded keys: p = 0 and log p finite, so they add 0
    log_s = relation_log_probs(student, relation_heads, mask)
    cross = (p_t.to(log_s.dtype) * log_s).sum(-1)
    return (neg_entropy.to(log_s.dtype) - cross).mean(1)


# ---------------------------------------------------------------------------------------------------- module names
def detect_qkv(names: Sequence[str], layer: int, architecture: str | None, side: str) -> tuple[str, str, str]:
    """The [query, key, value] names of layer `layer` (negative from the end) among a model's module names."""
    names = list(names)
    present = set(names)
    families = [architecture] if architecture is not None else list(ARCHITECTURES)
    found: dict[tuple[str, str], set[int]] = {}
    for family in families:
        pattern = ARCHITECTURES[family]
        regex = pattern.query_regex()
        for name in names:
            match = regex.match(name)
            if match and all(n in present for n in pattern.names(int(match["layer"]), match["prefix"])):
                found.setdefault((family, match["prefix"]), set()).add(int(match["layer"]))
    option = f"{side}_modules"
    if not found:
        which = f"the {architecture!r} pattern" if architecture else f"any of the patterns of {list(ARCHITECTURES)}"
        raise ValueError(
            f"minilm: no attention projections of the {side} match {which}; give {option} = [query, key, value] "
            "submodule names (from named_modules())."
        )
    if len(found) > 1:
        stacks = [f"{prefix}{ARCHITECTURES[family].layers}.* ({family})" for family, prefix in found]
        raise ValueError(
            f"minilm: the {side} has several attention stacks ({stacks}); give {option} = [query, key, value] "
            "names of the one to distil."
        )
    ((family, prefix), indices) = next(iter(found.items()))
    count = max(indices) + 1
    index = layer if layer >= 0 else count + layer
    if index not in indices:
        raise ValueError(
            f"minilm: {side}_layer={layer} refers to no layer of the {side}, which has {count} "
            f"(valid: {-count}..{count - 1})."
        )
    return ARCHITECTURES[family].names(index, prefix)


@register_term("minilm")
class MiniLMRelations(Term):
    unit = "tokens"
    Options = MiniLMOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._relations = _parse_relations(self.options.relations)
        self._explicit = {
            "student": _parse_modules(self.options.student_modules, "student_modules"),
            "teacher": _parse_modules(self.options.teacher_modules, "teacher_modules"),
        }
        self._bound: dict[str, tuple[str, str, str]] = {}
        self._resolved: dict[str, tuple[str, str, str]] | None = None
        self._auto_heads: int | None = None  # relation_heads="auto", resolved from the widths

    def bind_module_names(self, student_names: Sequence[str], teacher_names: Sequence[str]) -> None:
        """Detects each side's q/k/v projections among its module names (`named_modules()`), before `needs()`.

        For a trainer that passes the names right after building its terms (not part of the current contract:
        without this call, explicit names or `architecture` with non-negative layers are needed).
        """
        options = self.options
        layers = {"student": options.student_layer, "teacher": options.teacher_layer}
        for side, names in (("student", student_names), ("teacher", teacher_names)):
            if self._explicit[side] is None:
                self._bound[side] = detect_qkv(names, layers[side], options.architecture, side)
        self._resolved = None

    def _names(self, side: str) -> tuple[str, str, str]:
        explicit = self._explicit[side]
        if explicit is not None:
            return explicit
        if side in self._bound:
            return self._bound[side]
        options = self.options
        layer = options.student_layer if side == "student" else options.teacher_layer
        if options.architecture is None:
            raise ValueError(
                f"minilm: which {side} modules hold the queries, keys and values? Give {side}_modules = [query, "
                f"key, value] submodule names, or architecture ({' or '.join(map(repr, ARCHITECTURES))}) with a "
                f"non-negative {side}_layer."
            )
        if layer < 0:
            raise ValueError(
                f"minilm: {side}_layer={layer} counts from the end, but the {side}'s layer count is not known when "
                f"the term picks its modules (before the first forward); give {side}_layer as a non-negative "
                f"0-based index (e.g. 11 for the last of 12 layers), or {side}_modules = [query, key, value] names."
            )
        return ARCHITECTURES[options.architecture].names(layer)

    def module_names(self) -> dict[str, tuple[str, str, str]]:
        """Each side's (query, key, value) submodule names."""
        if self._resolved is None:
            self._resolved = {side: self._names(side) for side in SIDES}
        return self._resolved

    def needs(self) -> Needs:
        names = self.module_names()
        used = sorted({_PROJECTION[r] for r in self._relations})
        return Needs(
            student_modules=tuple(names["student"][i] for i in used),
            teacher_modules=tuple(names["teacher"][i] for i in used),
        )

    def _projections(self, side: Features, which: str, relation: str) -> torch.Tensor:
        name = self.module_names()[which][_PROJECTION[relation]]
        value = side.modules.get(name)
        if isinstance(value, (tuple, list)):
            value = value[0]
        if value is None:
            raise ValueError(f"minilm: the {which}'s submodule {name!r} produced no output in this forward.")
        return value

    def _heads(self, student: Features, teacher: Features) -> int:
        """The number of relation heads: the option's, or for "auto" the one the widths give (resolved once)."""
        if self.options.relation_heads != AUTO:
            return self.options.relation_heads
        if self._auto_heads is None:
            widths = {
                (which, relation): self._projections(side, which, relation).shape[-1]
                for relation in self._relations
                for which, side in (("student", student), ("teacher", teacher))
            }
            teacher_width = widths.get(
                ("teacher", "qq"), max(w for (which, _), w in widths.items() if which == "teacher")
            )
            self._auto_heads = auto_relation_heads(teacher_width, list(widths.values()))
        return self._auto_heads

    def setup(self, student: Features, teacher: Features, batch: TermBatch) -> None:
        self._auto_heads = None
        for relation in self._relations:
            for which, side in (("student", student), ("teacher", teacher)):
                value = self._projections(side, which, relation)
                if not isinstance(value, torch.Tensor) or value.dim() != 3:
                    name = self.module_names()[which][_PROJECTION[relation]]
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"minilm: the {which}'s {name!r} gives {shape}, not [batch, positions, width]; "
                        f"{which}_modules must name the query, key and value projections."
                    )
        heads = self._heads(student, teacher)
        for relation in self._relations:
            shapes = {}
            for which, side in (("student", student), ("teacher", teacher)):
                value = self._projections(side, which, relation)
                name = self.module_names()[which][_PROJECTION[relation]]
                if not isinstance(value, torch.Tensor) or value.dim() != 3:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"minilm: the {which}'s {name!r} gives {shape}, not [batch, positions, width]; "
                        f"{which}_modules must name the query, key and value projections."
                    )
                if batch.mask is not None and tuple(value.shape[:2]) != tuple(batch.mask.shape):
                    raise ValueError(
                        f"minilm: the {which}'s {name!r} gives {tuple(value.shape)}, but the attention mask is "
                        f"{tuple(batch.mask.shape)}; name projections of the stream the mask belongs to."
                    )
                if value.shape[-1] % heads:
                    kv = " (with grouped-query attention: num_key_value_heads * head_dim)" if relation != "qq" else ""
                    raise ValueError(
                        f"minilm: relation_heads={heads} does not divide the {which}'s {relation} width "
                        f"{value.shape[-1]}{kv} from {name!r}; choose relation_heads dividing both models' widths."
                    )
                shapes[which] = tuple(value.shape)
            if shapes["student"][:2] != shapes["teacher"][:2]:
                raise ValueError(
                    f"minilm: the student's {relation} projections are {shapes['student']} and the teacher's "
                    f"{shapes['teacher']}; both must cover the same positions."
                )

    def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        heads = self._heads(student, teacher)
        total = None
        first = self._projections(student, "student", self._relations[0])
        with torch.autocast(device_type=first.device.type, enabled=False):  # float32 at least
            for relation in self._relations:
                a_s = self._projections(student, "student", relation)
                a_t = self._projections(teacher, "teacher", relation)
                value = relation_kl(a_s, a_t, heads, batch.mask)
                total = value if total is None else total + value
        return masked_sum(total, batch.mask)
