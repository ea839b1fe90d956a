# The two commands a newcomer runs (README.md): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint typecheck protos
setup:
	VENV=$(VENV) scripts/install-deps.sh

demo: setup
	$(PY) -m fphint_lab.demo $(DEMO_ARGS)

# The QEMU integration tests run twice: against Debian's QEMU 7.2 (the default
# binary) and against 10.0 from bookworm-backports (scripts/install-qemu10.sh).
QEMU10 := /var/cache/fphint/qemu-10.0/bin/qemu-system-x86_64
QEMU_SUITE := tests/test_stream_qemu.py tests/test_qmp_*.py tests/test_migrate_cli.py

test: setup lint
	$(PY) -m pytest
	FPH_QEMU=$(QEMU10) $(PY) -m pytest -m "qemu and not vm" $(QEMU_SUITE)

# Lint, format and types over the packages, the lab, the tests and the benches
# (pyproject.toml says which files and rules); `make test` runs it first.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy

typecheck: setup
	$(PY) -m mypy

protos: setup
	$(PY) protos/generate.py
