# Switchyard: `make demo` runs the order-fulfilment demo on the embedded
# SQLite default; `make test` runs everything CI runs. Both install what they
# need on a fresh Debian machine with the Rust toolchain.
SHELL := /bin/bash
CARGO ?= cargo
# Contract tests of the stores are compiled in only for tests.
FEATURES := --features switchyard-store/contract

.PHONY: demo test lint test-rust bench build

demo:
	$(CARGO) run --release --quiet -p switchyard-examples --bin demo

build:
	$(CARGO) build --release -p switchyard

test: lint test-rust

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings

test-rust:
	$(CARGO) test --workspace $(FEATURES)

bench:
	bench/run --lang rust --store memory --steps 200000
	bench/run --lang rust --store sqlite --steps 100000
