# Two commands do all set-up on a fresh clone:  `make run` (the app)  and  `make test` (the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint setup bench sample-data clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip uninstall -q -y finetune 2>/dev/null || true   # this project's name before finetune-studio
	$(PY) -m pip install -q --no-deps -e .   # the `finetune` and `finetune-studio` commands
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) app.py $(ARGS)

# one pytest-xdist worker per core (TEST_WORKERS=0: none); a file's tests stay on one worker, so the
# runs and the app its module fixtures start are made once; the files go out in tests/conftest.py's
# order (the most slow tests first), not xdist's (the most tests first)
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST) $(ARGS)

# the tests under ~5 s each (no @pytest.mark.slow): the loop while editing
test-fast: setup
	$(PYTEST) -m "not slow" $(ARGS)

# ruff (lint, then the format) and mypy, as configured in pyproject.toml; the CI runs it before the tests
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy finetune

bench: setup
	$(PY) bench/benchmark.py $(ARGS)

sample-data: setup
	$(PY) -m finetune sample-data finetune/sample_data

clean:
	rm -rf $(VENV) .pytest_cache
