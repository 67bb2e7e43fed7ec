# The README's two commands are `make demo` and `make test`; both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On this project's development machines torch 2.13.0 is a CPU build on local disk; on
# PyPI the same pin is the CUDA build. Override with TORCH=torch for the newest release.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The dashboard's browser test drives Debian's Chromium; run as root, the set-up installs it.
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test bench chaos lint typecheck models clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo_autoscaling.py

browser:
	@test -x $(CHROMIUM) || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  >/dev/null; } || echo "note: no $(CHROMIUM): the dashboard's browser test will skip" \
	  "(as root: apt-get install chromium)"

test: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.run

# Counted fault injection (a few minutes): bench/results/chaos.json and a table.
chaos: $(STAMP)
	$(PY) -m bench.chaos

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

models: $(STAMP)
	$(PY) -m loader.examples model_repository

clean:
	rm -rf $(VENV) model_repository bench/results .demo
