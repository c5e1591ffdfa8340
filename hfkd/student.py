"""Build a shallower student from a teacher by copying a subset of its layers.

This is the initialisation DistilBERT uses: the student has the teacher's architecture and width but fewer
transformer layers (or, for conv nets, fewer blocks per stage), and starts from the teacher's own weights for
everything it keeps, a much better starting point for distillation than a random initialisation.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

__all__ = ["student_from_teacher"]

# Config attributes that commonly hold the number of layers of a stack, in the order in which stacks are
# numbered for the per-stack forms of `num_layers` / `layers`. Names are resolved through `config.attribute_map`
# (GPT-2's `num_hidden_layers` is really `n_layer`), so aliases of one attribute count once.
_COMMON_LAYER_COUNT_ATTRS = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "encoder_layers",
    "num_decoder_layers",
    "decoder_layers",
    "depths",
)

# Architectures where discovery finds more than one candidate attribute, mapped to the attributes that really
# hold the per-stack layer counts. Only the attributes are needed: which modules are the stacks is read off
# the model itself (see `_changed_containers`), so this stays valid for every head class of an architecture.
_LAYER_COUNT_ATTRS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    # Encoder-decoders: both stacks shrink (the encoder is listed first).
    "t5": ("num_layers", "num_decoder_layers"),
    "mt5": ("num_layers", "num_decoder_layers"),
    "bart": ("encoder_layers", "decoder_layers"),
    "mbart": ("encoder_layers", "decoder_layers"),
    "marian": ("encoder_layers", "decoder_layers"),
    "pegasus": ("encoder_layers", "decoder_layers"),
    # `num_hidden_layers` is an alias of `num_stages` there: the number of stages is not what we shrink.
    "convnext": ("depths",),
    "convnextv2": ("depths",),
}

# Config attributes holding one entry per layer (e.g. Qwen2's sliding vs full attention), which must follow the
# selected layers or the student would apply the wrong kind of attention to a copied layer.
_PER_LAYER_CONFIG_ATTRS = ("layer_types", "mlp_layer_types")

_CONTAINER_TYPES = (nn.ModuleList, nn.Sequential)


@dataclass(frozen=True)
class _Stack:
    """One stack of layers whose length a config attribute controls.

    Attributes:
        attr: Canonical config attribute name (after `attribute_map`).
        index: Position in a per-stage list attribute such as `depths`, or None for a scalar count.
        length: Number of layers the teacher has in this stack.
    """

    attr: str
    index: int | None
    length: int

    @property
    def name(self) -> str:
        return self.attr if self.index is None else f"{self.attr}[{self.index}]"


def student_from_teacher(
    teacher: PreTrainedModel,
    num_layers: int | Sequence[int] | None = None,
    layers: Sequence[int] | Sequence[Sequence[int]] | None = None,
) -> PreTrainedModel:
    """Build a shallower copy of `teacher` initialised from a subset of its layers (DistilBERT-style).

    The student is a fresh instance of the teacher's class with the same config except the number of layers.
    Everything outside the layer stacks (embeddings, output head, final norms, poolers) is copied from the teacher,
    and student layer `j` is a copy of teacher layer `layers[j]`. The student shares no tensor with the teacher, has
    the teacher's dtype, device (CPU if the teacher is spread over several) and train/eval mode, and is a plain model
    of a `transformers` class: `save_pretrained` + `AutoModelFor*.from_pretrained` reload it without this library.

    Which config attribute holds the layer count is found among the usual names (BERT-like encoders, ViT, GPT-2,
    Llama-like decoders, ...), with a small table for architectures where that is ambiguous; which modules are the
    layers is found by comparing the teacher with the smaller model. Encoder-decoders (T5, BART, ...) and conv nets
    (ResNet, ConvNeXt) have several stacks of layers, all of which shrink: numbered encoder first then decoder, or
    stage by stage, for the per-stack forms of the arguments.

    With `num_layers=k`, the kept layers are spread evenly and always include the first and the last teacher layer,
    `[round(i * (L - 1) / (k - 1)) for i in range(k)]` for a stack of `L` layers (`[L - 1]` when `k == 1`): keeping
    the bottom layer (which reads the embeddings) and the top one (which feeds the head) is what DistilBERT and most
    layer-pruning work do, so the copied head and embeddings keep the neighbours they were trained with. In ResNet
    the first block of each stage is also the only one that changes resolution and width, so a student must keep it:
    use `num_layers >= 2` or explicit `layers` there.

    Per-layer config lists such as `layer_types` (sliding vs full attention) are sliced to the kept layers. Behaviour
    that depends on a layer's index without a config list or weights of its own follows the new index (e.g. GPT-2's
    `scale_attn_by_inverse_layer_idx`, off by default), so only then does a student keeping every layer differ from
    its teacher.

    Args:
        teacher: The model to shrink.
        num_layers: How many layers the student keeps in each stack: one int for every stack, or one int per stack.
        layers: Which teacher layers (0-based, strictly increasing) the student keeps: one list for every stack, or
            one list per stack.

    Returns:
        The student model.

    Raises:
        ValueError: If both or neither of `num_layers` and `layers` are given, if they are out of range or not
            strictly increasing, or if the teacher's architecture is not one this function knows how to shrink (a
            student built by hand can be used instead).

    Example:
        >>> student = student_from_teacher(teacher, num_layers=6)  # BERT-base: teacher layers [0, 2, 4, 7, 9, 11]
    """
    if not isinstance(teacher, PreTrainedModel):
        raise ValueError(
            f"`teacher` must be a transformers PreTrainedModel, got {type(teacher).__name__}; "
            "build the student yourself for other models."
        )
    stacks, selections = _select(teacher, num_layers, layers)
    student_config = _student_config(teacher.config, stacks, selections)
    student = _instantiate(teacher, student_config)
    source_keys = _source_keys(teacher, student, stacks, selections)
    _copy_weights(teacher, student, source_keys)

    if getattr(teacher, "generation_config", None) is not None:
        # Generation defaults (e.g. loaded from the hub's generation_config.json) are not part of the config.
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)
    return student


def student_layers(
    teacher: PreTrainedModel,
    num_layers: int | Sequence[int] | None = None,
    layers: Sequence[int] | Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """The teacher layers `student_from_teacher` would keep, one list per stack, without building the student.

    It raises the same errors as `student_from_teacher`, so a recipe can check its student before a long stage
    (teacher fine-tuning) rather than after it.
    """
    return _select(teacher, num_layers, layers)[1]


def _select(teacher, num_layers, layers) -> tuple[list[_Stack], list[list[int]]]:
    if (num_layers is None) == (layers is None):
        raise ValueError(
            "Pass exactly one of `num_layers` (how many layers to keep, spread evenly) or `layers` "
            "(which teacher layer indices to keep), not " + ("both." if num_layers is not None else "neither.")
        )
    stacks = _find_stacks(teacher)
    if num_layers is not None:
        selections = [
            _spread(count, stack, len(stacks))
            for count, stack in zip(_per_stack(num_layers, stacks, "num_layers"), stacks)
        ]
    else:
        selections = [
            _check_indices(idx, stack, len(stacks)) for idx, stack in zip(_per_stack(layers, stacks, "layers"), stacks)
        ]
    return stacks, selections


def _model_type(model: PreTrainedModel) -> str:
    return getattr(model.config, "model_type", "") or type(model).__name__


def _unsupported(model: PreTrainedModel, reason: str) -> ValueError:
    return ValueError(
        f"Cannot build a student for model_type {_model_type(model)!r} ({type(model).__name__}): {reason}. "
        "Build the student yourself (e.g. a smaller config of the same class) and pass it instead."
    )


def _find_stacks(teacher: PreTrainedModel) -> list[_Stack]:
    """Find the config attributes holding the teacher's layer counts, one `_Stack` per stack of layers."""
    config = teacher.config
    container_lengths = {len(m) for m in teacher.modules() if isinstance(m, _CONTAINER_TYPES)}
    known = _LAYER_COUNT_ATTRS_BY_MODEL_TYPE.get(getattr(config, "model_type", ""))

    found: dict[str, list[_Stack]] = {}
    for name in known or _COMMON_LAYER_COUNT_ATTRS:
        attr = config.attribute_map.get(name, name)
        if attr in found:
            continue
        stacks = _stacks_of(config, attr)
        # A count with no module list of that length does not describe this model's layers: unrelated, or a stack
        # this head class lacks (T5EncoderModel has no decoder, yet its config has `num_decoder_layers`).
        if stacks and all(stack.length in container_lengths for stack in stacks):
            found[attr] = stacks

    if not found:
        raise _unsupported(
            teacher,
            "found no layer count matching a module list among the config attributes "
            + ", ".join(known or _COMMON_LAYER_COUNT_ATTRS),
        )
    if len(found) > 1 and not known:
        raise _unsupported(
            teacher,
            f"the config has several candidate layer counts ({', '.join(found)}) and it is ambiguous which to shrink",
        )
    return [stack for stacks in found.values() for stack in stacks]


def _stacks_of(config: PreTrainedConfig, attr: str) -> list[_Stack]:
    """The stacks a config attribute describes: one for a positive int, one per entry for a list of them."""
    value = getattr(config, attr, None)
    if _is_int(value) and value > 0:
        return [_Stack(attr, None, int(value))]
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) and v > 0 for v in value):
        return [_Stack(attr, i, int(v)) for i, v in enumerate(value)]
    return []


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `num_layers=True` is a mistake, not a request for one layer.
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _per_stack(value: object, stacks: list[_Stack], arg: str) -> list:
    """Broadcast a single `num_layers` / `layers` value to every stack, or check a per-stack one."""
    names = ", ".join(stack.name for stack in stacks)
    # A per-stack value is a sequence of ints (num_layers) or of sequences (layers); anything else is shared.
    per_stack = (
        not isinstance(value, (str, bytes))
        and isinstance(value, Sequence)
        and len(value) > 0
        and (all(_is_int(v) for v in value) if arg == "num_layers" else all(isinstance(v, Sequence) for v in value))
    )
    if not per_stack:
        return [value] * len(stacks)
    if len(value) != len(stacks):
        raise ValueError(
            f"`{arg}` has {len(value)} per-stack entries but the teacher has {len(stacks)} stack(s) of layers "
            f"({names}); pass one entry per stack in that order, or a single value for all of them."
        )
    return list(value)


def _per_stack_hint(num_stacks: int, arg: str) -> str:
    # Stacks of different depths (ResNet stages, a shallower decoder) may need a different value each.
    return (
        f" The teacher has {num_stacks} stacks of layers: `{arg}` can also give one value per stack."
        if num_stacks > 1
        else ""
    )


def _spread(count: object, stack: _Stack, num_stacks: int) -> list[int]:
    """Evenly spread `count` layers over the stack, always keeping its first and last layer."""
    if not _is_int(count):
        raise ValueError(f"`num_layers` must be an int (or one int per stack), got {count!r}.")
    count = int(count)
    if not 1 <= count <= stack.length:
        raise ValueError(
            f"`num_layers` must be between 1 and the teacher's {stack.length} layers (`{stack.name}`), got {count}."
            + _per_stack_hint(num_stacks, "num_layers")
        )
    if count == 1:
        return [stack.length - 1]
    return [round(i * (stack.length - 1) / (count - 1)) for i in range(count)]


def _check_indices(indices: object, stack: _Stack, num_stacks: int) -> list[int]:
    """Validate explicit teacher layer indices for one stack."""
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not all(_is_int(i) for i in indices):
        raise ValueError(
            f"`layers` must be a list of teacher layer indices (ints), or one such list per stack, got {indices!r}."
        )
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("`layers` is empty; keep at least one teacher layer.")
    bad = [i for i in indices if not 0 <= i < stack.length]
    if bad:
        raise ValueError(
            f"`layers` has indices {bad} out of range: the teacher has {stack.length} layers (`{stack.name}`), "
            f"so indices go from 0 to {stack.length - 1}." + _per_stack_hint(num_stacks, "layers")
        )
    if len(set(indices)) != len(indices):
        raise ValueError(f"`layers` has duplicate indices {indices}; list each teacher layer once.")
    if indices != sorted(indices):
        raise ValueError(
            f"`layers` must be strictly increasing so the student keeps the teacher's layer order, got {indices}; "
            f"use {sorted(indices)}."
        )
    return indices


def _student_config(config: PreTrainedConfig, stacks: list[_Stack], selections: list[list[int]]) -> PreTrainedConfig:
    """Deep-copy the teacher's config with the smaller layer counts and per-layer lists sliced to the kept layers."""
    new = copy.deepcopy(config)
    # The student is a new model: keeping the teacher's path would make peft adapters saved on it name the
    # teacher as their base model, and reload onto the wrong network.
    new._name_or_path = ""
    for attr in dict.fromkeys(stack.attr for stack in stacks):
        attr_stacks = [(stack, sel) for stack, sel in zip(stacks, selections) if stack.attr == attr]
        if attr_stacks[0][0].index is None:
            setattr(new, attr, len(attr_stacks[0][1]))
        else:
            # Keep the list's type: a strict config validates the field type on assignment.
            old = getattr(config, attr)
            setattr(new, attr, type(old)(len(sel) for _, sel in attr_stacks))

    for attr in _PER_LAYER_CONFIG_ATTRS:
        # Only instance data: ResNet has a class-level `layer_types` listing the block kinds it supports.
        values = vars(config).get(attr)
        if not isinstance(values, (list, tuple)):
            continue
        matching = {
            tuple(sel) for stack, sel in zip(stacks, selections) if stack.index is None and stack.length == len(values)
        }
        if len(matching) > 1:
            raise ValueError(
                f"Cannot tell which stack of layers the config's per-layer `{attr}` belongs to; "
                "pass the same `num_layers` / `layers` for every stack, or build the student yourself."
            )
        if matching:
            (sel,) = matching
            setattr(new, attr, type(values)(values[i] for i in sel))

    if hasattr(new, "validate"):
        # Strict configs (most of transformers 5) check consistency on save; fail now rather than then.
        try:
            new.validate()
        except Exception as err:
            raise ValueError(
                f"The student config for model_type {getattr(config, 'model_type', '')!r} is invalid ({err}). "
                "Build the student yourself and pass it instead."
            ) from err
    return new


def _instantiate(teacher: PreTrainedModel, config: PreTrainedConfig) -> PreTrainedModel:
    """Create an untrained model of the teacher's class on its dtype (and device, when it has a single one)."""
    devices = {p.device for p in teacher.parameters()}
    # A model sharded over several devices (device_map) has no single home: build on CPU and let the caller place it.
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    with device:
        # `_from_config` is what `AutoModel.from_config` uses: it builds `cls(config)` under the requested default
        # dtype (and DeepSpeed ZeRO-3 init when active), instead of building in float32 and casting afterwards.
        return type(teacher)._from_config(config, dtype=teacher.dtype)


def _containers(model: nn.Module) -> dict[str, int]:
    return {name: len(module) for name, module in model.named_modules() if isinstance(module, _CONTAINER_TYPES)}


def _changed_containers(
    teacher: PreTrainedModel, student: PreTrainedModel, stacks: list[_Stack], selections: list[list[int]]
) -> dict[str, list[int]]:
    """Map each module list whose length changed to the teacher indices its student entries come from.

    Comparing the two models, rather than hard-coding paths such as `bert.encoder.layer`, finds the stacks for any
    head class, and also finds lists that run parallel to the layers (one entry per layer, e.g. XLM's per-layer
    norms), which must keep the same layers.
    """
    teacher_lengths, student_lengths = _containers(teacher), _containers(student)
    changed: dict[str, list[int]] = {}
    shrunk: set[tuple[int, tuple[int, ...]]] = set()
    # Parents sort before their children, so lists nested in a changed one (inside its layers) are skipped.
    for path in sorted(teacher_lengths, key=lambda p: p.count(".") if p else -1):
        if path not in student_lengths or student_lengths[path] == teacher_lengths[path]:
            continue
        if any(path == c or path.startswith(f"{c}.") for c in changed):
            continue
        shape = (teacher_lengths[path], student_lengths[path])
        candidates = {tuple(sel) for stack, sel in zip(stacks, selections) if (stack.length, len(sel)) == shape}
        if len(candidates) != 1:
            raise _unsupported(
                teacher,
                f"the module list `{path}` went from {shape[0]} to {shape[1]} entries, which does not match "
                + ("any stack of layers" if not candidates else "a single stack of layers"),
            )
        changed[path] = list(candidates.pop())
        shrunk.add((shape[0], tuple(changed[path])))

    for stack, sel in zip(stacks, selections):
        if len(sel) != stack.length and (stack.length, tuple(sel)) not in shrunk:
            raise _unsupported(teacher, f"changing `{stack.name}` in the config did not shrink any module list")
    return changed


def _source_keys(
    teacher: PreTrainedModel, student: PreTrainedModel, stacks: list[_Stack], selections: list[list[int]]
) -> dict[str, str]:
    """Map every student state-dict key to the teacher key its value is copied from.

    Driving this from the student's keys (rather than renaming the teacher's) covers tied weights, which appear
    under both names in a state dict, and parameters that only some positions of a stack have, like T5's relative
    attention bias in block 0: the student's block 0 needs it even when it copies a teacher block that has none,
    and it then comes from the teacher's block 0, since it belongs to the position, not the layer.
    """
    changed = _changed_containers(teacher, student, stacks, selections)
    teacher_state, student_state = teacher.state_dict(), student.state_dict()

    sources: dict[str, str] = {}
    missing, mismatched = [], []
    for key, tensor in student_state.items():
        candidates = [key]
        for path, sel in changed.items():
            if key.startswith(f"{path}."):
                index, _, rest = key[len(path) + 1 :].partition(".")
                if index.isdigit():
                    candidates = [f"{path}.{sel[int(index)]}.{rest}", key]
                break
        source = next((c for c in candidates if c in teacher_state), None)
        if source is None:
            missing.append(key)
        elif teacher_state[source].shape != tensor.shape:
            mismatched.append(f"{key} {tuple(tensor.shape)} <- {source} {tuple(teacher_state[source].shape)}")
        else:
            sources[key] = source
    if missing or mismatched:
        details = "; ".join(
            ([f"no teacher weight for {', '.join(missing[:5])}"] if missing else [])
            + ([f"shape mismatch for {', '.join(mismatched[:5])}"] if mismatched else [])
        )
        hint = ""
        if any(sel[0] != 0 for sel in changed.values()):
            # e.g. ResNet: the first block of a stage downsamples and widens, the others cannot stand in for it.
            hint = "; a stack's first layer is often built differently, so try keeping it (`layers=[0, ...]`)"
        raise _unsupported(teacher, f"its layers differ by position ({details}){hint}")

    # Every weight of a kept teacher layer must reach the student: one left over would mean the layer is built
    # differently at its new position and the student silently lost part of it.
    used = set(sources.values())
    teacher_lengths = _containers(teacher)
    dropped = tuple(
        f"{path}.{i}." for path, sel in changed.items() for i in range(teacher_lengths[path]) if i not in sel
    )
    unused = [k for k in teacher_state if k not in used and not k.startswith(dropped)]
    if unused:
        raise _unsupported(
            teacher, f"some weights of the kept layers have no place in the student ({', '.join(unused[:5])})"
        )
    return sources


def _copy_weights(teacher: PreTrainedModel, student: PreTrainedModel, sources: dict[str, str]) -> None:
    """Copy the teacher's weights into the student, which owns its own tensors afterwards."""
    teacher_state = teacher.state_dict()
    # Tied weights (e.g. GPT-2's lm_head and input embeddings) are one tensor in the student, written once per
    # name. If the teacher's copies differ, its config says "tied" but its weights are not, and one would be lost.
    by_storage: dict[tuple[int, int], list[str]] = {}
    for key, tensor in student.state_dict().items():
        if tensor.numel():
            by_storage.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(key)
    for keys in by_storage.values():
        first = teacher_state[sources[keys[0]]]
        for key in keys[1:]:
            other = teacher_state[sources[key]]
            if other.data_ptr() != first.data_ptr() and not torch.equal(other.to(first.device), first):
                raise _unsupported(
                    teacher,
                    f"the student ties {keys[0]} and {key} but the teacher's {sources[keys[0]]} and {sources[key]} "
                    "differ (the config says the weights are tied, the teacher's weights are not)",
                )

    # load_state_dict copies into the student's own parameters (never aliasing the teacher's tensors) and, with
    # strict=True, re-checks that every student key received a value.
    student.load_state_dict({key: teacher_state[src] for key, src in sources.items()}, strict=True)
