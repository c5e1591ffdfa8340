"""The suite's own set-up: offline from the first import (conftest.py), and test modules independent of each other."""

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_the_hub_is_offline_for_every_test():
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set after transformers was imported, it is ignored.
    from huggingface_hub import constants, is_offline_mode

    assert constants.HF_HUB_OFFLINE is True
    assert is_offline_mode()


def test_test_modules_do_not_import_each_other():
    """Shared models, data and helpers live in tiny_models.py (and conftest.py), never in a test module."""
    offenders = []
    for path in sorted(HERE.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name} imports {name}" for name in names if name.split(".")[0].startswith("test_")]
    assert not offenders, offenders
