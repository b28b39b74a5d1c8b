# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-slow test-real clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mtdpo preprocess mtdpo/assets/sample.jsonl --out data_cache/demo --overwrite
	$(BIN)/mtdpo show-sample data_cache/demo --index 0

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

test-real: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,real]'
	$(BIN)/pytest -q -m real

clean:
	rm -rf data_cache runs .pytest_cache
