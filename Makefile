# Two commands for a fresh machine: `make demo` and `make test`. Both create or reuse .venv/ in the
# checkout and install what they need. Without CUDA, torch is the CPU build (`torch==2.13.0`, a file on
# disk here) so that no multi-GB CUDA wheel is pulled.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sv3d-installed
CPU_TORCH ?= torch==2.13.0
PYTHON ?= python3

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "installing torch (CUDA build)"; $(PY) -m pip install -q "torch>=2.4"; \
	  else \
	    echo "installing torch (CPU build: $(CPU_TORCH))"; $(PY) -m pip install -q $(CPU_TORCH); \
	  fi; \
	fi
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sv3d demo -o demo_output

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf demo_output build dist *.egg-info
