# The README's two commands: `make demo` (the main job) and `make test` (the suite). Both set up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint format demo clean

setup: $(VENV)/.installed

# torch is pinned first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $@

test: setup
	$(PY) -m ruff check hfkd tests examples recipes
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check hfkd tests examples recipes
	$(PY) -m ruff format --check hfkd tests examples recipes

format: setup
	$(PY) -m ruff format hfkd tests examples recipes
	$(PY) -m ruff check --fix hfkd tests examples recipes

# Recipe 1 end to end; it rewrites its own outputs/minilm-tweets/ on every run.
demo: setup
	$(VENV)/bin/hfkd distill --config recipes/text-classification/minilm-tweets.yaml --overwrite_output_dir true

clean:
	rm -rf $(VENV) outputs
