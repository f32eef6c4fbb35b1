# Two entry points (see README): `make demo` and `make test`. Both create .venv
# idempotently. torch is pinned to 2.13.0 here so pip takes the local CPU wheel;
# elsewhere any torch >= 2.4 works (pyproject.toml).
PY ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.distml-installed
# The test suite also needs the optional extras whose tests would otherwise skip.
TEST_STAMP := $(VENV)/.distml-test-installed

.PHONY: demo test setup lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,fl,serve,plot]" "$(TORCH_PIN)"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,fl,serve,plot,hf,ray]" "$(TORCH_PIN)"
	touch $(TEST_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/distml train

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q tests
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs build *.egg-info
