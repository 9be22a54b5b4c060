# One command each: set-up, demo, tests, lint, proto regeneration, benchmarks.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test demo test lint proto bench

setup:            ## virtualenv with torch 2.13.0 (CPU) and splice installed editable
	bash scripts/setup.sh

setup-test: setup ## + the Debian servers later test suites use (etcd, prometheus)
	bash scripts/setup.sh --servers

demo: setup       ## local demo: controller + 2 agents x 2 workers, one worker killed
	$(VENV)/bin/splice demo

test: setup-test  ## proto drift check + the whole test suite
	$(PY) scripts/genproto.py --check
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/test_layers.py
	$(PY) scripts/genproto.py --check

proto: setup      ## regenerate proto/*_pb2*.py from proto/*.proto
	$(PY) scripts/genproto.py

bench: setup      ## crash -> resume MTTR, splice vs torchrun (JSON lines)
	$(PY) -m bench.mttr
