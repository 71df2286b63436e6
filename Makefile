# `make test` sets up .venv from nothing (needs python3 >= 3.11 and pip) and runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

test: setup
	$(BIN)/python -m pytest -q
