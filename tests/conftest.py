"""Test-suite set-up, imported by pytest before any test module.

The suite never reaches the network: `HF_HUB_OFFLINE` is read once, when huggingface_hub is first imported, so it is
set here, before transformers, datasets or hfkd are imported by a test module. (Tests that pass a Hub id that does
not exist, or that push, rely on it; a plain `pytest tests` must not depend on the Makefile exporting it.)

The tiny models and data sets the modules share live in tiny_models.py; pytest puts this folder on sys.path.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
