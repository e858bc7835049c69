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

demo: $(STAMP)
	$(BIN)/psss-ioc bench core

test: $(STAMP)
	$(BIN)/ruff check psss_ioc tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/psss-ioc bench core
	$(BIN)/psss-ioc bench stream

clean:
	rm -rf $(VENV) build *.egg-info
