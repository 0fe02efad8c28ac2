# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-adapters lint bench pforge clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

demo: $(PY)
	$(PY) -m pip install -q -e .
	$(PY) examples/demo.py

test: $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pytest -q -n 2

# The OpenAI Agents SDK's own test suite, fetched from the package index, run against PforgeSession
# (on SQLite; its session contract files also on PostgreSQL, on a private server).
test-adapters: $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) tests/external/run_openai_agents_suite.py --backend all

lint: $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m ruff check pforge_async tests benchmarks examples
	$(PY) -m mypy

# `make pforge ARGS="tree demo"` runs the pforge command from the venv.
pforge: $(PY)
	$(PY) -m pip install -q -e .
	$(VENV)/bin/pforge $(ARGS)

bench: $(PY)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/actor_overhead.py
	$(PY) benchmarks/ledgers.py
	$(PY) benchmarks/turns.py
	$(PY) benchmarks/cas.py
	$(PY) benchmarks/subagents.py
	$(PY) benchmarks/attractor.py
	$(PY) benchmarks/adapters.py
	$(PY) benchmarks/gc.py
	$(PY) benchmarks/postgres.py

clean:
	rm -rf $(VENV) .pforge .pytest_cache .mypy_cache .ruff_cache
