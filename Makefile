# One-command entry points. `make run` trains the default job; `make test` runs the suite.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
CHECKOV_PIN := checkov==3.3.30
TOOLS := .tools
ARGS ?=

.PHONY: run test bench rehearse lint clean install install-dev tools

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

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev
tools: $(TOOLS)/checkov/bin/checkov

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

clean:
	rm -rf $(VENV) $(TOOLS) runs rehearsals .pytest_cache
