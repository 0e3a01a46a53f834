# Three commands: `make demo`, `make test` and `make bench`. Each bootstraps .venv once from the pinned, tested stack
# (requirements/lock.txt), and again from scratch when the lock or pyproject.toml changes. `make lock` refreshes the lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LOCK := requirements/lock.txt
LOCK_VENV := .venv-lock
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: install test demo bench lint clean lock

# Exactly the lock: a fresh venv, the pinned packages, then the project itself without resolving anything more; the
# check fails naming any package that differs from the lock.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep -m1 '^pip==' $(LOCK))"
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) requirements/lockfile.py check $(LOCK)
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m lit_videoalign.demo

# Every benchmark, results to benchmarks/results/ (BENCH_ARGS="--quick" for a smoke run, "--only overhead mfu" ...).
bench: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m benchmarks $(BENCH_ARGS)

# Refresh the lock: the newest stack pyproject.toml allows, in a scratch venv; the lock is written only if the whole
# test suite passes on it. Then `make test` reinstalls .venv from the new lock.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(LOCK_VENV)/bin/python -m pytest -q -p no:cacheprovider
	$(LOCK_VENV)/bin/python requirements/lockfile.py write $(LOCK)
	rm -rf $(LOCK_VENV)

lint: $(STAMP)
	$(PY) -m ruff check lit_videoalign reward_zoo tests

clean:
	rm -rf $(VENV) $(LOCK_VENV) outputs
