# cvmfs-inject — set-up, demo, tests, lint, benchmarks.
# `make demo` and `make test` work on a fresh Debian machine: as root they install what is
# missing (apt packages, then a venv); otherwise they print the apt-get command to run.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian package -> a program it provides (used to tell what is missing)
APT_PROGRAMS := skopeo:skopeo docker-registry:docker-registry umoci:umoci pigz:pigz \
                openssl:openssl apache2-utils:htpasswd ca-certificates:update-ca-certificates \
                podman:podman

.PHONY: all setup system-packages demo test lint bench bench-direct bench-stack bench-batch clean

all: test

setup: system-packages $(STAMP)

system-packages:
	@missing=""; \
	for pair in $(APT_PROGRAMS); do \
	  command -v "$${pair#*:}" >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; \
	done; \
	$(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing"; echo "run as root: $$cmd"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: setup
	$(PY) -m cvmfs_inject.demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

# Benchmarks time each command as an installed package runs: from compiled bytecode
# (pip compiles a wheel's modules; an editable install compiles them on first use, unless
# PYTHONDONTWRITEBYTECODE is set, and then every command would compile them again).
COMPILE = $(PY) -m compileall -q src >/dev/null

# the packer and unpack against their peers, then stacked updates and a batch plan
bench: setup
	$(COMPILE)
	$(PY) bench/run.py
	$(PY) bench/stack.py
	$(PY) bench/batch.py

bench-direct: setup
	$(COMPILE)
	$(PY) bench/direct.py

bench-stack: setup
	$(COMPILE)
	$(PY) bench/stack.py

bench-batch: setup
	$(COMPILE)
	$(PY) bench/batch.py

clean:
	rm -rf $(VENV) demo-out bench/cache .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
