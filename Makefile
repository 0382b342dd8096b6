# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the release this project is tested with; override on other machines,
# e.g. make demo TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# The suite runs one pytest worker per core (at most 4: each worker holds its own models), a test file per worker.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test app install lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,app,demo]"
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default config (tiny offline model + synthetic data, CPU; WordNet 3.0 for METEOR).
demo: $(STAMP)
	bash scripts/ensure-wordnet.sh
	$(BIN)/surgvqa run

## The test suite (installs Debian's chromium for the report's browser test and WordNet 3.0 for METEOR when missing).
test: $(STAMP)
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-wordnet.sh
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

## The web app on the demo's trained model (runs the demo first when it has not run yet).
app: $(STAMP)
	bash scripts/ensure-wordnet.sh
	$(BIN)/surgvqa run
	$(BIN)/surgvqa app

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs .cache
