# Node/TypeScript binding (issue 5). Included from the root Makefile:
#
#   include mk/node.mk
#   test: ... test-node
#
# `make test-node` works on a fresh Debian machine with Node >= 18, npm and
# the Rust toolchain: it installs the package's devDependencies (typescript,
# @types/node) from typescript/package-lock.json, builds the napi-rs addon
# (bindings/node) in release mode, compiles typescript/src, checks that the
# committed typescript/index.d.ts matches the compiler's output, assembles
# the package, `npm pack`s it, installs the tarball into a scratch project
# under the target directory and runs the node:test suite (typescript/test)
# and the examples (examples/typescript) from there, so they import the
# installed package, never the source tree.

CARGO ?= cargo
NPM ?= npm
NODE ?= node
NODE_TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))
NODE_STAGE := $(NODE_TARGET_DIR)/node-stage
NODE_DIST := $(NODE_TARGET_DIR)/node-dist
NODE_SCRATCH := $(NODE_TARGET_DIR)/node-scratch
NODE_ADDON := $(REL_DIR)/libswitchyard_node.so
NODE_TS := $(CURDIR)/typescript
NODE_DEMO_WORKER := $(NODE_SCRATCH)/demo_worker.mjs
NODE_TEST_ARGS ?=
# The cross-language test also runs a Python worker when this interpreter
# can import switchyard (`make python-wheel`); it is skipped otherwise.
NODE_PYTHON ?= $(CURDIR)/target/venv-py/bin/python

.PHONY: test-node node-package node-deps node-addon node-build node-dts-check node-dts-update

# Installs exactly what the lock file says; reruns when it changes.
node-deps: $(NODE_TS)/node_modules/.ready

$(NODE_TS)/node_modules/.ready: $(NODE_TS)/package.json $(NODE_TS)/package-lock.json
	cd $(NODE_TS) && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

# One cargo invocation for the addon and the binaries the tests use, so
# feature unification does not rebuild the core twice.
node-addon: $(ZIG_DEPS)
	$(CARGO_REL) -p switchyard-node -p switchyard -p switchyard-e2e --lib --bin switchyard --bin testhost

# Compiles typescript/src into typescript/build/dist.
node-build: node-deps
	rm -rf $(NODE_TS)/build
	cd $(NODE_TS) && ./node_modules/.bin/tsc -p tsconfig.json

# The committed index.d.ts must be what the compiler generates from src/.
node-dts-check: node-build
	@diff -u $(NODE_TS)/index.d.ts $(NODE_TS)/build/dist/index.d.ts || { \
	  echo "typescript/index.d.ts is out of date: run 'make node-dts-update' and commit it" >&2; exit 1; }

node-dts-update: node-build
	cp $(NODE_TS)/build/dist/index.d.ts $(NODE_TS)/index.d.ts

# The npm platform name of $(TARGET) (napi-rs convention): linux-x64-gnu,
# linux-arm64-gnu, linux-x64-musl, ...
NODE_ARCH := $(if $(filter x86_64,$(ZIG_ARCH)),x64,$(if $(filter aarch64,$(ZIG_ARCH)),arm64,$(ZIG_ARCH)))
NODE_PLATFORM ?= linux-$(NODE_ARCH)-$(if $(findstring musl,$(TARGET)),musl,gnu)
# Every platform package there is (typescript/npm/*): the main package lists
# them all as optionalDependencies, npm installs the one whose os/cpu/libc fit.
# Another platform: a directory typescript/npm/<platform> (package.json with
# os, cpu, libc; README.md) and its name in PLATFORM_PACKAGES
# (typescript/src/index.ts), then `make node-package TARGET=<rust target>` on
# a machine with that target's standard library.
NODE_PLATFORMS := $(notdir $(wildcard $(NODE_TS)/npm/*))
NODE_ADD_OPTIONAL := const fs = require("fs"); const p = JSON.parse(fs.readFileSync("package.json")); \
  p.optionalDependencies = Object.fromEntries(process.argv.slice(1).map(n => ["@switchyard/" + n, p.version])); \
  fs.writeFileSync("package.json", JSON.stringify(p, null, 2) + "\n");

# Assembles, packs and installs the packages the way users get them: the main
# package `switchyard` (JavaScript, types; optionalDependencies on every
# @switchyard/<platform> at the same version, added here so that the source
# package.json and its lock file need none) and @switchyard/$(NODE_PLATFORM)
# (the addon, built for $(TARGET)). Both tarballs go to $(NODE_DIST) and are
# installed offline into an empty project. For `make demo`: run
# `$(NODE) $(NODE_DEMO_WORKER) --store URL` afterwards (ESM resolves
# `switchyard` next to the script, i.e. the installed package).
node-package: node-addon node-dts-check
	rm -rf $(NODE_STAGE) $(NODE_DIST) $(NODE_SCRATCH)
	mkdir -p $(NODE_STAGE)/main/dist $(NODE_STAGE)/$(NODE_PLATFORM) $(NODE_DIST) $(NODE_SCRATCH)
	cp $(NODE_TS)/package.json $(NODE_TS)/index.mjs $(NODE_TS)/index.d.ts $(NODE_TS)/README.md \
	  $(CURDIR)/LICENSE $(CURDIR)/CHANGELOG.md $(NODE_STAGE)/main/
	cp $(NODE_TS)/build/dist/index.js $(NODE_STAGE)/main/dist/
	cd $(NODE_STAGE)/main && $(NODE) -e '$(NODE_ADD_OPTIONAL)' $(NODE_PLATFORMS)
	cp $(NODE_TS)/npm/$(NODE_PLATFORM)/package.json $(NODE_TS)/npm/$(NODE_PLATFORM)/README.md $(CURDIR)/LICENSE $(NODE_STAGE)/$(NODE_PLATFORM)/
	# The release profile strips the addon (root Cargo.toml).
	cp $(NODE_ADDON) $(NODE_STAGE)/$(NODE_PLATFORM)/switchyard.$(NODE_PLATFORM).node
	cd $(NODE_STAGE)/main && $(NPM) pack --silent --pack-destination $(NODE_DIST) >/dev/null
	cd $(NODE_STAGE)/$(NODE_PLATFORM) && $(NPM) pack --silent --pack-destination $(NODE_DIST) >/dev/null
	printf '{"name":"switchyard-scratch","private":true,"version":"0.0.0"}\n' > $(NODE_SCRATCH)/package.json
	cd $(NODE_SCRATCH) && $(NPM) install --offline --no-audit --no-fund --loglevel=error \
	  $(NODE_DIST)/switchyard-[0-9]*.tgz $(NODE_DIST)/switchyard-$(NODE_PLATFORM)-*.tgz
	cp $(CURDIR)/examples/typescript/demo_worker.mjs $(NODE_DEMO_WORKER)

# Tests and examples are copied next to the installed package: ESM resolves
# `import "switchyard"` from the importing file's directory.
test-node: node-package
	rm -rf $(NODE_SCRATCH)/test $(NODE_SCRATCH)/examples
	cp -r $(NODE_TS)/test $(NODE_SCRATCH)/test
	cp -r $(CURDIR)/examples/typescript $(NODE_SCRATCH)/examples
	$(NODE_TS)/node_modules/.bin/tsc -p $(NODE_SCRATCH)/examples --typeRoots $(NODE_TS)/node_modules/@types --types node
	cd $(NODE_SCRATCH) && SWITCHYARD_CLI=$(REL_DIR)/switchyard \
	  SWITCHYARD_README=$(CURDIR)/README.md \
	  SWITCHYARD_TESTHOST=$(REL_DIR)/testhost \
	  SWITCHYARD_PYTHON=$(NODE_PYTHON) \
	  timeout -k 10 900 $(NODE) --test --test-reporter=spec $(NODE_TEST_ARGS) test/*.test.mjs
