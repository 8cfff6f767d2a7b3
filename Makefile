# gram-ray: the two commands are `make demo` and `make test`; both set up from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2

.PHONY: help setup ffmpeg test test-slow lint typecheck demo bench clean

help:
	@echo "make demo       set up, then run the whole pipeline end to end on local Ray + sqlite MLflow"
	@echo "make test       set up, then lint, type-check and run the test suite (every behaviour, small sizes;"
	@echo "                two test processes; about 18 minutes of tests on 2 cores)"
	@echo "make test-slow  the long load and soak runs of tests/load (about 2 minutes on 2 cores):"
	@echo "                2,000 clips preprocessed, driver memory growing < 150 MiB after 30% of the run;"
	@echo "                2,000 training steps, rank-0 memory growing < 40 MiB, throughput > 60% of its start"
	@echo "make setup      create $(VENV) with every Python dependency and install ffmpeg"
	@echo "make bench      run the speed benchmarks in benchmarks/ (about 30 minutes)"

setup: $(STAMP) ffmpeg

# torch first with pip, from the pinned CPU build; then the project with every
# extra, resolved and installed by uv (the same versions pip picks; ~20 s instead of ~5 min),
# compiled to bytecode at install: where .pyc files cannot be written later
# (PYTHONDONTWRITEBYTECODE), every new process, each Ray worker among them,
# would compile ray and mlflow again (imports 15 s instead of 6 s here).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python >= 3.11 needed)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -e ".[dev]"
	touch $(STAMP)

ffmpeg:
	@bash infra/scripts/install-ffmpeg.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: setup
	$(PY) -m mypy

# pytest runs in PYTEST_WORKERS processes (the tests on the session's Ray cluster all in
# one, see tests/conftest.py) while mypy checks the types beside them; its report follows
# the tests', and the target fails if either fails.
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	@$(PY) -m mypy > $(VENV)/mypy.log 2>&1 & types=$$!; \
	echo "$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)  (mypy beside it)"; \
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); tests=$$?; \
	wait $$types; typed=$$?; echo "mypy:"; cat $(VENV)/mypy.log; \
	test $$tests -eq 0 && test $$typed -eq 0

# The long load and soak runs: deselected from `make test` by the `load` marker (pyproject.toml).
test-slow: setup
	$(PY) -m pytest -m load tests/load $(PYTEST_ARGS)

demo: setup
	$(PY) -m jobs.demo

# The speed benchmarks (about 30 minutes on 2 cores); the AV-digits quality
# benchmarks are `gram bench av-digits` and `gram bench av-digits-features`
# (both need $GRAM_SHARED_DATA/av-digits).
bench: setup
	PYTHONPATH=. $(PY) benchmarks/bench_volume.py
	PYTHONPATH=. $(PY) benchmarks/bench_model.py
	PYTHONPATH=. $(PY) benchmarks/bench_train.py
	PYTHONPATH=. $(PY) benchmarks/bench_preprocess.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
