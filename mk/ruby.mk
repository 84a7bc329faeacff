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
# The precompiled gem's platform, from $(TARGET): x86_64-linux, aarch64-linux,
# x86_64-linux-musl, ...
RB_PLATFORM ?= $(ZIG_ARCH)-linux$(if $(findstring musl,$(TARGET)),-musl)
# test-ruby also installs the source gem (compiling the extension at install
# time, about 80 s: only the three Switchyard crates compile again) and
# smoke-tests it (test-ruby-source); RB_SOURCE_GEM=0 skips that.
RB_SOURCE_GEM ?= 1

.PHONY: deps-ruby ruby-gem ruby-source-gem test-ruby-source ruby-cli test-ruby test-ruby-gc bench-ruby

# Ruby's headers (ruby-dev) and libclang (for rb-sys's bindgen).
deps-ruby:
	@if dpkg -s ruby-dev libclang-dev >/dev/null 2>&1; then :; else \
	  echo "installing ruby-dev and libclang-dev (apt-get)"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ruby ruby-dev libclang-dev >/dev/null; \
	fi

ruby-gem: deps-ruby $(ZIG_DEPS)
	$(CARGO_REL) -p switchyard-ruby
	cp $(REL_DIR)/libswitchyard_native.so ruby/lib/switchyard/switchyard_native.so
	rm -rf $(RB_PKG) && mkdir -p $(RB_PKG)
	cp LICENSE CHANGELOG.md ruby/
	cd ruby && SWITCHYARD_GEM_PLATFORM=$(RB_PLATFORM) $(GEM) build --silent switchyard.gemspec && mv switchyard-*.gem $(RB_PKG)/
	rm -rf $(RB_GEM_HOME)
	env -u GEM_PATH GEM_HOME=$(RB_GEM_HOME) $(GEM) install --local --no-document $(RB_PKG)/switchyard-$(RB_VERSION)-*.gem

# The source gem (platform `ruby`): ruby/ext/switchyard_native gets the
# Magnus crate (binding/), the core crates it links (crates/), a workspace
# Cargo.toml made from the root one and the root Cargo.lock; extconf.rb
# (committed) builds them with cargo at `gem install` time.
RB_EXT := $(CURDIR)/ruby/ext/switchyard_native
ruby-source-gem: deps-ruby
	cd $(RB_EXT) && ls -A | grep -vx extconf.rb | xargs -r rm -rf
	mkdir -p $(RB_EXT)/crates $(RB_EXT)/binding
	for c in switchyard-core switchyard-store; do \
	  mkdir -p $(RB_EXT)/crates/$$c && cp -r crates/$$c/README.md crates/$$c/src $(RB_EXT)/crates/$$c/ && \
	  awk '/^\[\[test\]\]/ { skip = 1; next } /^\[/ { skip = 0 } !skip' crates/$$c/Cargo.toml > $(RB_EXT)/crates/$$c/Cargo.toml; done
	cp -r bindings/ruby/Cargo.toml bindings/ruby/src $(RB_EXT)/binding/
	cp Cargo.lock $(RB_EXT)/Cargo.lock
	# The root workspace, with only these members and path dependencies.
	sed -e 's|^members = .*|members = ["binding", "crates/switchyard-core", "crates/switchyard-store"]|' \
	  -e '/^switchyard-serve = /d' Cargo.toml | \
	  awk '/^\[profile\.release\.package\.switchyard-c\]/ { skip = 1; next } /^\[/ { skip = 0 } !skip' > $(RB_EXT)/Cargo.toml
	cp LICENSE CHANGELOG.md ruby/
	mkdir -p $(RB_PKG)
	cd ruby && SWITCHYARD_GEM=source $(GEM) build --silent switchyard.gemspec && mv switchyard-$(RB_VERSION).gem $(RB_PKG)/

RB_VERSION = $(shell sed -n 's/.*VERSION = "\(.*\)"/\1/p' ruby/lib/switchyard/version.rb)

# Installs the source gem into an empty GEM_HOME the way a user without a
# precompiled gem does (it compiles the extension: the Rust toolchain and
# libclang are needed) and runs a smoke test. cargo reuses the release
# build's dependencies (same target directory, target and linker); only the
# three Switchyard crates compile again, from the gem's copy.
RB_SRC_GEM_HOME := $(abspath target/ruby-gems-source)
test-ruby-source: ruby-source-gem $(ZIG_DEPS)
	rm -rf $(RB_SRC_GEM_HOME)
	env -u GEM_PATH GEM_HOME=$(RB_SRC_GEM_HOME) CARGO_TARGET_DIR=$(PKG_TARGET_DIR) \
	  CARGO_BUILD_TARGET=$(TARGET) $(ZIG_ENV) \
	  $(GEM) install --local --no-document $(RB_PKG)/switchyard-$(RB_VERSION).gem
	cd $(RB_SRC_GEM_HOME) && env -u GEM_PATH -u RUBYLIB -u RUBYOPT GEM_HOME=$(RB_SRC_GEM_HOME) \
	  $(RUBY) $(CURDIR)/ruby/test/source_gem_smoke.rb $(RB_SRC_GEM_HOME)

ruby-cli: $(ZIG_DEPS)
	$(CARGO_REL) -p switchyard -p switchyard-e2e --bin switchyard --bin testhost

# From inside the GEM_HOME: the source tree's ruby/lib is never on the load
# path (ruby/test/helper.rb checks that the gem was loaded from GEM_HOME).
# A hung run (a deadlock) fails after 10 minutes instead of eating CI's time.
RB_RUN = cd $(RB_GEM_HOME) && env -u GEM_PATH -u RUBYLIB -u RUBYOPT GEM_HOME=$(RB_GEM_HOME) \
	  SWITCHYARD_CLI=$(REL_DIR)/switchyard \
	  SWITCHYARD_TESTHOST=$(REL_DIR)/testhost \
	  SWITCHYARD_EXAMPLES=$(CURDIR)/examples/ruby \
	  timeout -k 10 600 $(RUBY) -I$(CURDIR)/ruby/test

test-ruby: ruby-gem ruby-cli $(if $(filter 1,$(RB_SOURCE_GEM)),test-ruby-source)
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
