"""Test-suite set-up, imported by pytest before any test module.

The suite never reaches the network: `HF_HUB_OFFLINE` is read once, when huggingface_hub is first imported, so it is
set here, before transformers, datasets or hfkd are imported by a test module. (Tests that pass a Hub id that does
not exist, or that push, rely on it; a plain `pytest tests` must not depend on the Makefile exporting it.)

The tiny models and data sets the modules share live in tiny_models.py; pytest puts this folder on sys.path.
"""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A tiny BERT teacher with a tokenizer, and a CSV of labelled sentences, on disk (recipe_runs.make_tiny_text)."""
    from recipe_runs import make_tiny_text

    return make_tiny_text(tmp_path_factory.mktemp("tiny_text"))
