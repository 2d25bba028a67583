# Two entry points: `make run` and `make test`. Both set up .venv on first use and are quick after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXAMPLES := examples
OUT ?= out/examples

.PHONY: run test lint setup weights browser bench clean

setup: $(STAMP)

# torch is pinned first so that a CPU build already on disk is used; an unpinned torch
# would pull a multi-gigabyte CUDA build on machines without a GPU.
# The rest comes from requirements.lock: exact versions install without dependency resolution.
$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

weights: $(STAMP)
	$(VENV)/bin/dreamfocus models fetch isnet-general-use

run: weights
	$(VENV)/bin/dreamfocus run $(EXAMPLES) $(OUT)

test: lint weights browser
	$(PY) -m pytest -q

# Headless Chromium for the review page's browser test, from Debian's packages, without root:
# unpacked once into .cache/chromium (25 to 60 s, 105 packages, 500 MB on a bare Debian 12).
browser:
	sh scripts/get_chromium.sh .cache/chromium

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) scripts/bench_effect.py

clean:
	rm -rf out
