# C ABI (issue 7). Included from the root Makefile:
#
#   include mk/c.mk
#   test: lint test-rust test-python test-c
#
# `make test-c` builds the `switchyard-c` crate (libswitchyard.so and
# libswitchyard.a), checks that the committed include/switchyard.h matches
# what cbindgen generates (installing cbindgen 0.29 with cargo if missing),
# checks that every C name of the README's Vocabulary table is in the header
# (bindings/c/tests/vocabulary.sh), compiles the C API test and the example
# with gcc against the header, runs
# the test under valgrind (leaks and invalid accesses fail it; the only
# suppressions are tokio runtime threads alive at exit, see
# bindings/c/tests/valgrind.supp) and runs the example linked both against
# the shared library (memory store) and statically (SQLite store), and the
# order-fulfilment example (examples/c/orders.c, all handlers in C, on a
# fresh SQLite file), which exits non-zero unless the order is delivered.

CARGO ?= cargo
C_CC ?= gcc
C_TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))
C_LIB_DIR := $(REL_DIR)
C_OUT := $(C_TARGET_DIR)/c
C_FLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -Iinclude
# What the Rust static library needs from the system (rustc --print native-static-libs).
C_STATIC_LIBS := -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
C_VALGRIND := valgrind --child-silent-after-fork=yes --leak-check=full --errors-for-leak-kinds=definite,possible \
	--error-exitcode=1 --suppressions=bindings/c/tests/valgrind.supp

.PHONY: test-c c-lib c-header c-header-check deps-c c-bench c-install install

# `make install PREFIX=/opt/sy` (default /usr/local; DESTDIR honoured):
# lib/libswitchyard.so and .a (the .so stripped, the .a without debug info), include/switchyard.h,
# lib/pkgconfig/switchyard.pc and share/doc/switchyard (LICENSE, CHANGELOG, README), so C programs build with
# `pkg-config --cflags --libs switchyard`.
PREFIX ?= /usr/local
C_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

# Root runs apt-get directly; anyone else through sudo.
C_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

deps-c:
	@if command -v $(C_CC) >/dev/null && command -v valgrind >/dev/null && command -v pkg-config >/dev/null; then :; else \
		echo "installing gcc, valgrind and pkg-config (apt-get)"; \
		$(C_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(C_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev valgrind pkg-config >/dev/null; \
	fi

c-lib: $(ZIG_DEPS)
	$(CARGO_REL) -p switchyard-c

install: c-install

c-install: c-lib
	install -d $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/include
	install -m 755 $(C_LIB_DIR)/libswitchyard.so $(DESTDIR)$(PREFIX)/lib/libswitchyard.so
	install -m 644 $(C_LIB_DIR)/libswitchyard.a $(DESTDIR)$(PREFIX)/lib/libswitchyard.a
	$(STRIP) --strip-unneeded $(DESTDIR)$(PREFIX)/lib/libswitchyard.so
	$(STRIP) --strip-debug $(DESTDIR)$(PREFIX)/lib/libswitchyard.a
	install -m 644 include/switchyard.h $(DESTDIR)$(PREFIX)/include/switchyard.h
	install -d $(DESTDIR)$(PREFIX)/share/doc/switchyard
	install -m 644 LICENSE CHANGELOG.md bindings/c/README.md $(DESTDIR)$(PREFIX)/share/doc/switchyard/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(C_VERSION)|' -e 's|@STATIC_LIBS@|$(C_STATIC_LIBS)|' \
	  bindings/c/switchyard.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/switchyard.pc

# Fails if include/switchyard.h is stale; `make c-header` regenerates it.
c-header-check:
	bindings/c/check-header.sh

c-header:
	bindings/c/check-header.sh --write

test-c: deps-c c-lib c-header-check
	mkdir -p $(C_OUT)
	C_CC=$(C_CC) C_OUT=$(C_OUT) bindings/c/tests/vocabulary.sh $(C_LIB_DIR)
	$(C_CC) $(C_FLAGS) bindings/c/tests/c_api.c -L$(C_LIB_DIR) -lswitchyard -o $(C_OUT)/c_api
	$(C_CC) $(C_FLAGS) examples/c/hello.c -L$(C_LIB_DIR) -lswitchyard -o $(C_OUT)/hello
	$(C_CC) $(C_FLAGS) examples/c/hello.c $(C_LIB_DIR)/libswitchyard.a $(C_STATIC_LIBS) -o $(C_OUT)/hello-static
	LD_LIBRARY_PATH=$(C_LIB_DIR) $(C_VALGRIND) $(C_OUT)/c_api
	LD_LIBRARY_PATH=$(C_LIB_DIR) $(C_OUT)/hello memory > $(C_OUT)/hello.out
	cat $(C_OUT)/hello.out && grep -q '"greeting":"Hello, C!"' $(C_OUT)/hello.out
	rm -rf $(C_OUT)/hello.db*
	$(C_CC) $(C_FLAGS) examples/c/orders.c -L$(C_LIB_DIR) -lswitchyard -lpthread -o $(C_OUT)/orders
	LD_LIBRARY_PATH=$(C_LIB_DIR) $(C_OUT)/orders
	$(C_OUT)/hello-static sqlite:$(C_OUT)/hello.db > $(C_OUT)/hello.out
	cat $(C_OUT)/hello.out && grep -q '"greeting":"Hello, C!"' $(C_OUT)/hello.out
	rm -rf $(C_OUT)/hello.db*
	# A clean stop joins every idle callback thread without a word: 20 runs,
	# none may report a callback "still running" (a stop once counted threads
	# between their exit message and their return as stuck, 1 run in 4).
	for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do \
	  rm -rf $(C_OUT)/loop.db*; \
	  $(C_OUT)/hello-static sqlite:$(C_OUT)/loop.db > /dev/null 2> $(C_OUT)/hello.err || exit 1; \
	  if grep -q 'still running' $(C_OUT)/hello.err; then cat $(C_OUT)/hello.err; exit 1; fi; \
	done; rm -rf $(C_OUT)/loop.db*
	# Installed the way a user installs it, and the example built with
	# pkg-config against the installed files only (no -Iinclude).
	rm -rf $(C_OUT)/prefix
	$(MAKE) --no-print-directory c-install PREFIX=$(C_OUT)/prefix CARGO=$(CARGO)
	PKG_CONFIG_PATH=$(C_OUT)/prefix/lib/pkgconfig pkg-config --modversion switchyard | grep -qx '$(C_VERSION)'
	$(C_CC) -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror examples/c/hello.c \
	  $$(PKG_CONFIG_PATH=$(C_OUT)/prefix/lib/pkgconfig pkg-config --cflags --libs switchyard) -o $(C_OUT)/hello-pc
	LD_LIBRARY_PATH=$(C_OUT)/prefix/lib $(C_OUT)/hello-pc memory | grep -q '"greeting":"Hello, C!"'
	$(C_CC) -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror examples/c/hello.c \
	  $$(PKG_CONFIG_PATH=$(C_OUT)/prefix/lib/pkgconfig pkg-config --cflags switchyard) \
	  $(C_OUT)/prefix/lib/libswitchyard.a $$(PKG_CONFIG_PATH=$(C_OUT)/prefix/lib/pkgconfig pkg-config --static --libs-only-l switchyard | sed 's/-lswitchyard//') \
	  -o $(C_OUT)/hello-pc-static
	$(C_OUT)/hello-pc-static memory | grep -q '"greeting":"Hello, C!"'
	@echo "installed C library: $$(du -h $(C_OUT)/prefix/lib/libswitchyard.so | cut -f1) .so, $$(du -h $(C_OUT)/prefix/lib/libswitchyard.a | cut -f1) .a (.so stripped, .a without debug info)"

# The C benchmark (bench/run --lang c), linked statically like a C program
# that ships without the shared library.
c-bench: deps-c c-lib
	mkdir -p $(C_OUT)
	$(C_CC) $(C_FLAGS) -O2 bench/c_bench.c $(C_LIB_DIR)/libswitchyard.a $(C_STATIC_LIBS) -o $(C_OUT)/c_bench
