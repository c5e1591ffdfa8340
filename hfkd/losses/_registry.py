"""Name -> loss function tables. They fill when `hfkd.losses` is imported."""

from collections.abc import Callable

LOGIT_LOSSES: dict[str, Callable] = {}
HIDDEN_LOSSES: dict[str, Callable] = {}
ATTENTION_LOSSES: dict[str, Callable] = {}


def _register(table: dict[str, Callable], kind: str, name: str) -> Callable[[Callable], Callable]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"A {kind} loss needs a non-empty string name, got {name!r}.")

    def decorator(fn: Callable) -> Callable:
        # Re-registering the same function (a module imported twice) is harmless; another function is a clash.
        previous = table.get(name)
        same = previous is not None and (previous.__module__, previous.__qualname__) == (
            fn.__module__,
            fn.__qualname__,
        )
        if previous is not None and previous is not fn and not same:
            raise ValueError(f"A {kind} loss named {name!r} is already registered ({table[name].__qualname__}).")
        table[name] = fn
        return fn

    return decorator


def register_logit_loss(name: str) -> Callable[[Callable], Callable]:
    """Registers `fn(student_logits, teacher_logits, *, temperature, beta) -> per-position loss` as `name`."""
    return _register(LOGIT_LOSSES, "logit", name)


def register_hidden_loss(name: str) -> Callable[[Callable], Callable]:
    """Registers `fn(student, teacher) -> per-position loss` over the last (feature) axis as `name`."""
    return _register(HIDDEN_LOSSES, "hidden", name)


def register_attention_loss(name: str) -> Callable[[Callable], Callable]:
    """Registers `fn(student_probs, teacher_probs) -> [batch, query] loss` as `name`."""
    return _register(ATTENTION_LOSSES, "attention", name)
