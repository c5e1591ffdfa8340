"""Which student layer learns from which teacher layer.

Indices are those of the tuples transformers returns: `hidden_states` has one entry per layer plus the embeddings
output at index 0; `attentions` has one entry per layer.
"""

from __future__ import annotations

LayerMapSpec = str | list[int]

_NAMED = ("uniform", "last")


def parse_layer_map_spec(spec: LayerMapSpec, field_name: str) -> LayerMapSpec:
    """Normalises a layer-map value from Python or the command line.

    Returns 'uniform', 'last' or a list of ints; '0,2,4' and '[0, 2, 4]' both become [0, 2, 4].
    """
    if isinstance(spec, (list, tuple)):
        values = list(spec)
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text in _NAMED:
            return text
        text = text.strip("[]() ")
        try:
            values = [int(part) for part in text.replace(" ", ",").split(",") if part]
        except ValueError:
            raise ValueError(
                f"{field_name}={spec!r} is neither 'uniform', 'last' nor a comma-separated list of integers "
                "such as '0,2,4,6'."
            ) from None
    else:
        raise ValueError(f"{field_name} must be 'uniform', 'last' or a list of integers, got {type(spec).__name__}.")
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{field_name}={spec!r} must hold at least one integer index.")
    if any(v < 0 for v in values):
        raise ValueError(f"{field_name}={spec!r} holds a negative index; use explicit indices counted from 0.")
    return values


def resolve_layer_map(
    spec: LayerMapSpec, num_student: int, num_teacher: int, *, field_name: str, has_embeddings: bool
) -> list[tuple[int, int]]:
    """Pairs (student index, teacher index) for one stack of layers.

    Args:
        spec: 'uniform', 'last' or one teacher index per student entry.
        num_student: number of entries in the student's tuple (layers + 1 for hidden states).
        num_teacher: number of entries in the teacher's tuple.
        field_name: config field named in error messages.
        has_embeddings: True for `hidden_states` tuples, whose entry 0 is the embeddings output.
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(f"{field_name}: the models returned no layers to match.")
    if spec == "last":
        return [(num_student - 1, num_teacher - 1)]
    if spec == "uniform":
        if has_embeddings:
            # Entry k after k of L_s layers matches the teacher entry after the same fraction of its depth.
            layers_s, layers_t = num_student - 1, num_teacher - 1
            if layers_s == 0:
                return [(0, 0)]
            return [(k, round(k * layers_t / layers_s)) for k in range(num_student)]
        return [(k, round((k + 1) * num_teacher / num_student) - 1) for k in range(num_student)]
    if len(spec) != num_student:
        what = "hidden_states entries (layers + 1 for the embeddings)" if has_embeddings else "attention layers"
        raise ValueError(
            f"{field_name} has {len(spec)} entries but the student has {num_student} {what}; give one teacher "
            f"index per student entry, e.g. {_example(num_student, num_teacher, has_embeddings)}, or use 'uniform'."
        )
    out_of_range = [t for t in spec if t >= num_teacher]
    if out_of_range:
        raise ValueError(
            f"{field_name} refers to teacher index {out_of_range[0]}, but the teacher has only {num_teacher} entries "
            f"(valid indices 0..{num_teacher - 1})."
        )
    return list(enumerate(spec))


def _example(num_student: int, num_teacher: int, has_embeddings: bool) -> str:
    pairs = resolve_layer_map("uniform", num_student, num_teacher, field_name="example", has_embeddings=has_embeddings)
    return "'" + ",".join(str(t) for _, t in pairs) + "'"
