# Switchyard: `make demo` runs the order-fulfilment demo on the embedded
# SQLite default; `make test` runs everything CI runs. Both install what they
# need on a fresh Debian machine with the Rust toolchain.
SHELL := /bin/bash
CARGO ?= cargo
# Contract tests of the stores are compiled in only for tests.
FEATURES := --features switchyard-store/contract

.PHONY: demo test lint test-rust bench build deps-postgres deps-prometheus

# Root runs apt-get directly; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The order workflow runs in a Rust host; worker processes in other
# languages serve some of its steps on the same SQLite file: Python
# notify.customer (the wheel, installed into target/venv-py), Node
# charge.payment (the npm package, installed into target/node-scratch) and
# Ruby invoice.issue (the gem, installed into target/ruby-gems).
demo: python-wheel node-package ruby-gem
	$(CARGO_REL) --quiet -p switchyard-examples --bin demo
	$(REL_DIR)/demo \
	  --python $(PY_VENV_ABS)/bin/python --node-worker $(NODE_DEMO_WORKER) \
	  --ruby-gem-home $(RB_GEM_HOME)

build: $(ZIG_DEPS)
	$(CARGO_REL) -p switchyard

# check-artefacts runs last: it measures the packages the tests before it
# built (sizes, stripping, glibc symbol versions: mk/package.mk).
test: check-versions check-crates lint check-docs test-rust test-python test-c test-node test-ruby test-conformance test-dashboard check-artefacts

# Every package file carries the workspace version (scripts/check-versions).
check-versions:
	scripts/check-versions

# clippy --workspace compiles the Ruby extension (rb-sys needs ruby-dev and
# libclang).
lint: deps-ruby
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings

test-rust: deps-postgres deps-prometheus
	$(CARGO) test --workspace $(FEATURES)
	# The REST API's HTTP, /metrics, load and schema suites again, on a throwaway PostgreSQL.
	SWITCHYARD_SERVE_TEST_STORE=postgres $(CARGO) test -p switchyard-serve --test api --test metrics --test load --test schemas

# The metrics tests check every host's /metrics with `promtool check metrics`
# (Debian's prometheus package).
deps-prometheus:
	@if command -v promtool >/dev/null 2>&1; then :; else \
		echo "installing promtool (apt-get install prometheus)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	fi

# The PostgreSQL tests start their own throwaway server (initdb in a temp dir,
# a free port on 127.0.0.1); they need the server binaries installed.
deps-postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; else \
		echo "installing PostgreSQL server binaries (apt-get install postgresql)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

include mk/package.mk
include mk/python.mk
include mk/c.mk
include mk/node.mk
include mk/ruby.mk
include mk/conformance.mk
include mk/dashboard.mk

bench:
	bench/run --lang rust --store memory --steps 200000
	bench/run --lang rust --store sqlite --steps 100000
