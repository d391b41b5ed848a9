# Two entry points, both working on a fresh machine: `make demo` and `make test`.
# Everything goes into .venv; constraints.txt pins torch to the CPU wheel these machines carry (see README).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/vfl: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,demo]'
	touch $@

demo: $(BIN)/vfl
	$(BIN)/vfl demo

test: $(BIN)/vfl
	$(BIN)/python -m pytest -q

bench: $(BIN)/vfl
	$(BIN)/python bench/wire.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
