# One-command entry points. `make run` trains the default job; `make test` runs the suite.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
CHECKOV_PIN := checkov==3.3.30
TRITON_PIN := triton==3.9.0
TOOLS := .tools
ARGS ?=

.PHONY: run test bench rehearse lint clean install install-dev tools wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-run
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# checkov pins its own versions of hcl2 and friends: it lives in its own venv.
$(TOOLS)/checkov/bin/checkov:
	$(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install --quiet $(CHECKOV_PIN)

# triton for the Triton scan's tests (its interpreter, on the CPU), kept out of .venv: once it is
# importable, `import torch` imports it too, and a process that ends in an error mid-run then
# prints nanobind leak reports after its error line. The tests put it on a child's path.
$(TOOLS)/triton/triton/__init__.py: | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps --target $(TOOLS)/triton $(TRITON_PIN)

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev
tools: $(TOOLS)/checkov/bin/checkov $(TOOLS)/triton/triton/__init__.py

run: install
	$(BIN)/mamba-training train --config configs/tiny.yaml $(ARGS)

test: install-dev tools
	$(BIN)/lint-imports
	PATH="$(abspath $(BIN)):$(abspath $(TOOLS)/checkov/bin):$$PATH" $(BIN)/python -m pytest -n 2 --dist loadgroup $(ARGS)

# The whole fleet on this machine (moto server, Terraform stack, reconciler, agents, spot interruptions).
rehearse: install-dev
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mamba-training rehearse $(ARGS)

bench: install-dev
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/throughput.py

# Wheels for bench/gpu.sh on a GPU machine that can fetch nothing: the package's dependencies
# (torch, triton and transformers are expected there) for CPython $(WHEEL_PY) on manylinux x86_64.
WHEEL_PY ?= 3.12
wheels:
	$(PYTHON) -m pip download --quiet --dest .whl --only-binary=:all: --implementation cp \
	  --python-version $(WHEEL_PY) --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -r <($(PYTHON) bench/gpu.py --requirements)

clean:
	rm -rf $(VENV) $(TOOLS) runs rehearsals .pytest_cache
