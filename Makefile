# Three commands: `make demo`, `make test` and `make bench`. Each bootstraps .venv once (and again only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m lit_videoalign.demo

# Every benchmark, results to benchmarks/results/ (BENCH_ARGS="--quick" for a smoke run, "--only overhead mfu" ...).
bench: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m benchmarks $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check lit_videoalign reward_zoo tests

clean:
	rm -rf $(VENV) outputs
