# Every target creates .venv on first use: a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo-run

.PHONY: demo test test-fast bench best-student venv clean

venv: $(STAMP)

# torch first, pinned: an unpinned torch pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/clockdistill demo --workdir $(DEMO)

bench: $(STAMP)
	$(PY) tests/bench/teacher_quality.py

best-student: $(STAMP)
	$(VENV)/bin/clockdistill best-student

clean:
	rm -rf $(DEMO) .pytest_cache
