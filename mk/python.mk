# Python binding (issue 4). Included from the root Makefile:
#
#   include mk/python.mk
#   test: lint test-rust test-python
#
# `make test-python` works on a fresh Debian machine with python3 and the
# Rust toolchain: it creates (or reuses) a virtualenv, installs maturin and
# pytest with pip, builds the abi3 wheel from python/pyproject.toml, installs
# that wheel with pip and runs python/tests from outside the source tree, so
# the tests import the installed wheel. The Rust CLI is built too, for the
# test where a Python worker and the CLI share one store.

CARGO ?= cargo
PYTHON ?= python3
PY_VENV ?= target/venv-py
PY_WHEELS ?= target/wheels-py
PY_TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))
PY_VENV_ABS := $(abspath $(PY_VENV))
PY_WHEELS_ABS := $(abspath $(PY_WHEELS))
PYTEST_ARGS ?=

.PHONY: test-python python-venv python-wheel python-cli

python-venv: $(PY_VENV_ABS)/.ready-mypy

# Debian ships venv/ensurepip separately: install it when it is missing.
# The stamp names the newest dependency, so older venvs get it installed.
$(PY_VENV_ABS)/.ready-mypy:
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  echo "installing python3-venv"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	fi
	$(PYTHON) -m venv $(PY_VENV_ABS)
	$(PY_VENV_ABS)/bin/python -m pip install --quiet --upgrade pip
	$(PY_VENV_ABS)/bin/python -m pip install --quiet 'maturin>=1.5,<2' 'pytest>=7' 'mypy>=1.5'
	touch $@

python-wheel: python-venv
	rm -f $(PY_WHEELS_ABS)/switchyard-*.whl
	cd python && CARGO_TARGET_DIR=$(PY_TARGET_DIR) $(PY_VENV_ABS)/bin/maturin build --release --out $(PY_WHEELS_ABS)
	$(PY_VENV_ABS)/bin/python -m pip install --quiet --force-reinstall --no-deps $(PY_WHEELS_ABS)/switchyard-*.whl

python-cli:
	CARGO_TARGET_DIR=$(PY_TARGET_DIR) $(CARGO) build --release -p switchyard -p switchyard-examples --bin switchyard --bin demo

# Runs from inside the venv directory: the source tree's python/ is never on
# sys.path (python/tests/conftest.py checks that).
test-python: python-wheel python-cli
	cd $(PY_VENV_ABS) && SWITCHYARD_CLI=$(PY_TARGET_DIR)/release/switchyard \
	  SWITCHYARD_DEMO=$(PY_TARGET_DIR)/release/demo \
	  timeout -k 10 900 bin/python -m pytest $(CURDIR)/python/tests -p no:cacheprovider $(PYTEST_ARGS)
