# Two entry points: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# GPU machines bring their own CUDA torch; CPU-only machines get the CPU build (an unpinned torch
# would pull a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	@if $(PY) -c "import torch" 2>/dev/null; then echo "using installed torch"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then echo "CUDA machine: install your CUDA torch into $(VENV) first" >&2; exit 1; \
	else $(PIP) install -q "$(TORCH_CPU)"; fi
	# DeepSpeed ships only an sdist whose build imports torch: build it against the torch above.
	$(PIP) install -q --no-build-isolation deepspeed
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/upmoe demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(VENV)/bin/upmoe bench moe-layer

clean:
	rm -rf $(VENV) demo_out .pytest_cache
