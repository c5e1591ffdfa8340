"""Names for several models given together (teachers, peers, caches): a list is numbered, a dict keeps its names."""


def named_teachers(teachers) -> dict[str, object]:
    """`teacher_model` as {name: model or name_or_path}: a single teacher is {"teacher": it}; a list gets names
    `teacher0`, `teacher1`, ...; a dict keeps its names. Refuses an empty list, an unnamed entry and a teacher given
    twice."""
    return named_models(teachers, "teacher", "teacher_model", "use teacher_weights to weigh one more")


def named_models(models, role: str, field: str, twice_hint: str) -> dict[str, object]:
    """`field` as {name: model or name_or_path} (see named_teachers); `twice_hint` says what to do instead of
    giving a model twice."""
    if isinstance(models, dict):
        items = list(models.items())
    elif isinstance(models, (list, tuple)):
        items = [(f"{role}{i}", m) for i, m in enumerate(models)]
    else:
        return {role: models}
    if not items:
        raise ValueError(
            f"{field} is an empty list: give one {role}, or a list or dict of several (models, Hub ids or paths)."
        )
    seen: dict[object, str] = {}
    for name, model in items:
        if not isinstance(name, str) or not name or "/" in name or "." in name or name == "student":
            raise ValueError(
                f"{role.title()} names must be non-empty strings without '/' or '.', not 'student'; got {name!r}."
            )
        key = id(model) if not isinstance(model, str) else model
        if key in seen:
            raise ValueError(
                f"The {role} {name!r} is the same as {seen[key]!r}: a {role} given twice would count twice. Give "
                f"each {role} once ({twice_hint})."
            )
        seen[key] = name
    return dict(items)
