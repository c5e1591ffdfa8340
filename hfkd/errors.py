"""The errors hfkd raises for its own reasons (the rest are ValueError and TypeError naming the field to fix)."""


class TeacherCacheError(ValueError):
    """The cache cannot be built from these inputs, or does not belong to this run."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; raised before the bad update is applied."""
