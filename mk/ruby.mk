# Ruby binding (issue 6). Included from the root Makefile:
#
#   include mk/ruby.mk
#   test: lint test-rust test-python test-c test-ruby
#   lint: deps-ruby    (clippy --workspace compiles the Magnus crate)
#
# `make test-ruby` works on a fresh Debian machine with the Rust toolchain:
# `deps-ruby` installs ruby-dev and libclang-dev (rb-sys generates its
# bindings with libclang) when they are missing; `ruby-gem` builds the
# extension with cargo, packages a precompiled platform gem into
# target/ruby-pkg and installs it with `gem install --local` into a private
# GEM_HOME (target/ruby-gems), so no gem server is needed and the system is
# not modified; `test-ruby` runs ruby/test (minitest, bundled with Ruby)
# from inside that GEM_HOME, against the installed gem, then a reduced set
# under GC.stress. The release CLI and the Rust test host are built too, for
# the tests where a Ruby worker shares a store with them.

CARGO ?= cargo
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUBY ?= ruby
GEM ?= gem
RB_TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))
RB_PKG := $(abspath target/ruby-pkg)
RB_GEM_HOME := $(abspath target/ruby-gems)
RB_TESTOPTS ?=

.PHONY: deps-ruby ruby-gem ruby-cli test-ruby test-ruby-gc bench-ruby

# Ruby's headers (ruby-dev) and libclang (for rb-sys's bindgen).
deps-ruby:
	@if dpkg -s ruby-dev libclang-dev >/dev/null 2>&1; then :; else \
	  echo "installing ruby-dev and libclang-dev (apt-get)"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ruby ruby-dev libclang-dev >/dev/null; \
	fi

ruby-gem: deps-ruby
	CARGO_TARGET_DIR=$(RB_TARGET_DIR) $(CARGO) build --release -p switchyard-ruby
	cp $(RB_TARGET_DIR)/release/libswitchyard_native.so ruby/lib/switchyard/switchyard_native.so
	rm -rf $(RB_PKG) && mkdir -p $(RB_PKG)
	cd ruby && $(GEM) build --silent switchyard.gemspec && mv switchyard-*.gem $(RB_PKG)/
	rm -rf $(RB_GEM_HOME)
	env -u GEM_PATH GEM_HOME=$(RB_GEM_HOME) $(GEM) install --local --no-document $(RB_PKG)/switchyard-*.gem

ruby-cli:
	CARGO_TARGET_DIR=$(RB_TARGET_DIR) $(CARGO) build --release -p switchyard -p switchyard-e2e --bin switchyard --bin testhost

# From inside the GEM_HOME: the source tree's ruby/lib is never on the load
# path (ruby/test/helper.rb checks that the gem was loaded from GEM_HOME).
# A hung run (a deadlock) fails after 10 minutes instead of eating CI's time.
RB_RUN = cd $(RB_GEM_HOME) && env -u GEM_PATH -u RUBYLIB -u RUBYOPT GEM_HOME=$(RB_GEM_HOME) \
	  SWITCHYARD_CLI=$(RB_TARGET_DIR)/release/switchyard \
	  SWITCHYARD_TESTHOST=$(RB_TARGET_DIR)/release/testhost \
	  SWITCHYARD_EXAMPLES=$(CURDIR)/examples/ruby \
	  timeout -k 10 600 $(RUBY) -I$(CURDIR)/ruby/test

test-ruby: ruby-gem ruby-cli
	$(RB_RUN) $(CURDIR)/ruby/test/run.rb $(sort $(wildcard $(CURDIR)/ruby/test/test_*.rb)) -- $(RB_TESTOPTS)
	@echo "== the reduced set again under GC.stress =="
	$(RB_RUN) $(CURDIR)/ruby/test/run.rb $(CURDIR)/ruby/test/gc_stress.rb

# Only the GC.stress run, against the gem already installed.
test-ruby-gc:
	$(RB_RUN) $(CURDIR)/ruby/test/run.rb $(CURDIR)/ruby/test/gc_stress.rb

# bench/run builds and installs the gem itself; the Rust figure on the same
# store, for comparison: bench/run --lang rust --store sqlite --steps 50000
bench-ruby:
	bench/run --lang ruby --store sqlite --steps 50000 --threads 4
