# How the shipped binaries are built (issue 25). Included from the root
# Makefile before the language files, which build with $(CARGO_REL) and find
# what it built in $(REL_DIR).
#
#   TARGET      the Rust target (default x86_64-unknown-linux-gnu). Every
#               release build passes --target $(TARGET), so the binaries land
#               in target/$(TARGET)/release. A release machine with the
#               aarch64 or musl standard library (rustup target add ...) runs
#               e.g. `make dist TARGET=aarch64-unknown-linux-gnu`; only the
#               x86_64 gnu target is installed here.
#   GLIBC_MIN   the oldest glibc the gnu binaries run on (default 2.17, the
#               manylinux2014 baseline): zig's clang (pip package `ziglang`,
#               installed into the Makefile's venv) links every binary and
#               compiles every C dependency (bundled SQLite, rb-sys's shims)
#               against that glibc's symbol versions, through scripts/zigcc.
#   ZIG=0       build with the system gcc instead (binaries then need the
#               build machine's glibc; `make check-artefacts` fails).
#
# The release profile (Cargo.toml) has no debug info and strips symbols, so
# cargo's outputs are what ships; the dev profile keeps debug info.

CARGO ?= cargo
# binutils' strip; another target's binaries need that target's (or llvm-strip).
STRIP ?= strip
TARGET ?= x86_64-unknown-linux-gnu
GLIBC_MIN ?= 2.17
ZIG ?= 1
PKG_TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))
REL_DIR := $(PKG_TARGET_DIR)/$(TARGET)/release
PKG_PY := $(abspath target/venv-py)/bin/python

# x86_64-unknown-linux-gnu -> x86_64-linux-gnu.2.17; *-musl -> ARCH-linux-musl.
ZIG_ARCH := $(word 1,$(subst -, ,$(TARGET)))
ZIG_TARGET ?= $(if $(findstring musl,$(TARGET)),$(ZIG_ARCH)-linux-musl,$(ZIG_ARCH)-linux-gnu.$(GLIBC_MIN))
TARGET_UPPER := $(shell echo '$(TARGET)' | tr 'a-z-' 'A-Z_')
TARGET_LOWER := $(subst -,_,$(TARGET))

ifeq ($(ZIG),1)
ZIG_ENV := SWITCHYARD_ZIG_PYTHON=$(PKG_PY) SWITCHYARD_ZIG_TARGET=$(ZIG_TARGET) \
	CARGO_TARGET_$(TARGET_UPPER)_LINKER=$(CURDIR)/scripts/zigcc \
	CC_$(TARGET_LOWER)=$(CURDIR)/scripts/zigcc CXX_$(TARGET_LOWER)=$(CURDIR)/scripts/zigc++
ZIG_DEPS := python-venv
else
ZIG_ENV :=
ZIG_DEPS :=
endif

# One command line for every release build of what ships or what the tests
# run next to it, so they share one set of compiled dependencies.
CARGO_REL = env CARGO_TARGET_DIR=$(PKG_TARGET_DIR) $(ZIG_ENV) $(CARGO) build --release --target $(TARGET)

# Sizes, stripping and glibc versions of everything that ships, after the
# packages are built (`make test` runs it last, when they already are).
.PHONY: check-artefacts check-versions
PKG_C_PREFIX := $(PKG_TARGET_DIR)/dist-c
check-artefacts: python-wheel node-package ruby-gem c-lib python-cli
	rm -rf $(PKG_C_PREFIX)
	$(MAKE) --no-print-directory c-install PREFIX=$(PKG_C_PREFIX) CARGO=$(CARGO) >/dev/null
	GLIBC_MIN=$(GLIBC_MIN) REL_DIR=$(REL_DIR) WHEELS=$(PY_WHEELS_ABS) GEMS=$(RB_PKG) NPM_DIST=$(NODE_DIST) \
	  C_PREFIX=$(PKG_C_PREFIX) scripts/check-artefacts

# The published crates package (versions on path dependencies, metadata,
# README and LICENSE inside each .crate). --no-verify: compiling each crate
# alone from its package would rebuild every dependency once more; the
# workspace tests compile the same sources.
PKG_CRATES := switchyard-core switchyard-store switchyard-serve switchyard
.PHONY: check-crates check-docs
# `cargo doc --no-deps` of the published crates, warnings as errors.
check-docs:
	RUSTDOCFLAGS="-D warnings" CARGO_TARGET_DIR=$(PKG_TARGET_DIR) $(CARGO) doc --no-deps $(addprefix -p ,$(PKG_CRATES))

check-crates:
	rm -f $(PKG_TARGET_DIR)/package/switchyard*.crate
	CARGO_TARGET_DIR=$(PKG_TARGET_DIR) $(CARGO) package --no-verify --allow-dirty $(addprefix -p ,$(PKG_CRATES))
	@for c in $(PKG_CRATES); do f=$(PKG_TARGET_DIR)/package/$$c-$(C_VERSION).crate; \
	  for want in Cargo.toml README.md LICENSE src/lib.rs; do \
	    tar -tzf $$f | grep -qx "$$c-$(C_VERSION)/$$want" || { echo "FAIL: $$f has no $$want" >&2; exit 1; }; done; \
	  n=$$(tar -xzOf $$f $$c-$(C_VERSION)/Cargo.toml | grep -c '^\(description\|repository\|license\|readme\|keywords\) ='); \
	  [ "$$n" = 5 ] || { echo "FAIL: $$c's Cargo.toml lacks one of description, repository, license, readme, keywords" >&2; exit 1; }; \
	  printf 'crate %-18s %8s bytes, README, LICENSE, metadata\n' $$c $$(stat -c %s $$f); \
	done
