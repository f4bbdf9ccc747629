# Two commands do all set-up on a fresh machine (see README):
#   make demo   - the whole pipeline on the embedded sample: sample -> curate -> cluster ->
#                 train (seed + 4 experts, and a single model of equal compute) -> eval;
#                 results in demo_out/summary.md and demo_out/eval/*.png
#   make test   - lint (ruff check + format check), then run the test suite
# Both create or reuse .venv and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mode-fast demo --out demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest benchmarks/bench_*.py -q

clean:
	rm -rf build demo_out *.egg-info
