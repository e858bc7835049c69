# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The IOC and the built-in simulated camera, processing; Ctrl-C stops both.
demo: $(STAMP)
	$(BIN)/psss-ioc demo

test: $(STAMP)
	$(BIN)/ruff check psss_ioc tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/psss-ioc bench core
	$(BIN)/psss-ioc bench stream
	$(BIN)/psss-ioc bench e2e

clean:
	rm -rf $(VENV) build *.egg-info
