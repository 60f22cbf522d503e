# Two commands for a newcomer on a fresh machine:
#   make demo   set up .venv and run the pipeline on the bundled sample corpus with a tiny model
#   make test   set up .venv and run the test suite (CPU; GPU tests skip themselves without CUDA)
# Both are idempotent: the environment is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the CPU torch build (a CUDA build of torch is several GB). Override for other setups,
# e.g. make test TORCH_SPEC='torch>=2.11'.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0')
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PIP) install -q --disable-pip-version-check -e '.[dev]' '$(TORCH_SPEC)'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mosaic-embed demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check mosaic_embed tests benchmarks

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
