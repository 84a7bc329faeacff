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
# The wheel's platform tag: manylinux2014 (glibc 2.17) for the gnu targets.
# maturin checks the extension's symbol versions against it and refuses a
# wheel that needs more. It links with the Makefile's zig wrapper
# (mk/package.mk), the same linker as every other release build, so the
# shared dependencies are compiled once; `maturin --zig` would bring its own
# wrapper and rebuild them.
# With ZIG=0 (the system linker) maturin tags the wheel for this machine's glibc.
PY_COMPAT ?= $(if $(filter 1,$(ZIG)),$(if $(findstring musl,$(TARGET)),--compatibility musllinux_1_2,--compatibility manylinux2014))

.PHONY: test-python python-venv python-wheel python-cli

python-venv: $(PY_VENV_ABS)/.ready-zig

# Debian ships venv/ensurepip separately: install it when it is missing.
# The stamp names the newest dependency, so older venvs get it installed.
$(PY_VENV_ABS)/.ready-zig:
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  echo "installing python3-venv"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	fi
	$(PYTHON) -m venv $(PY_VENV_ABS)
	$(PY_VENV_ABS)/bin/python -m pip install --quiet --upgrade pip
	$(PY_VENV_ABS)/bin/python -m pip install --quiet 'maturin>=1.5,<2' 'pytest>=7' 'mypy>=1.5' 'ziglang>=0.13'
	touch $@

python-wheel: python-venv
	rm -f $(PY_WHEELS_ABS)/switchyard-*.whl
	cd python && env CARGO_TARGET_DIR=$(PY_TARGET_DIR) $(ZIG_ENV) $(PY_VENV_ABS)/bin/maturin build --release \
	  --target $(TARGET) $(PY_COMPAT) --out $(PY_WHEELS_ABS)
	$(PY_VENV_ABS)/bin/python -m pip install --quiet --force-reinstall --no-deps $(PY_WHEELS_ABS)/switchyard-*.whl

python-cli: $(ZIG_DEPS)
	$(CARGO_REL) -p switchyard -p switchyard-examples --bin switchyard --bin demo

# Runs from inside the venv directory: the source tree's python/ is never on
# sys.path (python/tests/conftest.py checks that).
test-python: python-wheel python-cli
	cd $(PY_VENV_ABS) && SWITCHYARD_CLI=$(REL_DIR)/switchyard \
	  SWITCHYARD_DEMO=$(REL_DIR)/demo \
	  timeout -k 10 900 bin/python -m pytest $(CURDIR)/python/tests -p no:cacheprovider $(PYTEST_ARGS)
