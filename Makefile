# The two commands a newcomer runs (README.md): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test check typecheck protos
setup:
	VENV=$(VENV) scripts/install-deps.sh

demo: setup
	$(PY) -m host_collector.demo

test: setup
	$(PY) -m pytest

typecheck: setup
	$(PY) -m mypy

protos: setup
	$(PY) protos/generate.py
