# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Each creates the virtualenv it needs. On GPU machines install your CUDA torch first and set
# TORCH_SPEC= (empty) so the CPU wheel is not forced.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) launch/ring_attention_demo.py --nproc $(NPROC)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ring_sp megatron_patch launch tests benchmarks

.PHONY: venv demo test lint
