# Quick start: `make demo` (runs the whole pipeline on embedded defaults) and `make test`.
# Each target creates the virtualenv and installs what it needs (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo serve test test-fast weights bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (a local wheel on these machines), so the project's range is already met.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ichnode demo

serve: $(STAMP)
	$(BIN)/ichnode serve

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Re-create the bundled demo weights (not part of CI; see models/weights/*/MODEL_CARD.md).
weights: $(STAMP)
	$(BIN)/ichnode train triage --out models/weights/triage
	$(BIN)/ichnode train segment --out models/weights/segment
	$(BIN)/ichnode train ner --out models/weights/ner

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/deface.py
	$(BIN)/python benchmarks/ner.py

clean:
	rm -rf var demo-out .pytest_cache
