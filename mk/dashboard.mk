# The web dashboard in a real browser (tests/dashboard/dashboard.test.mjs):
# the `switchyard` binary serves a temporary SQLite store that a real Rust
# host (crates/switchyard-serve/examples/dashboard_seed.rs) fills; headless
# Chromium (Debian's chromium package) is driven by playwright-core, installed
# pinned into target/dash-test (it downloads no browser). Screenshots go to
# target/dashboard-screenshots/; the tasks page's first render over
# DASH_BULK_TASKS tasks (default 1,000,000; 0 skips it) is printed.
# Included from the root Makefile.

DASH_PLAYWRIGHT_VERSION := 1.57.0
DASH_DIR := target/dash-test
DASH_BULK_TASKS ?= 1000000
DASH_TARGET := $(or $(CARGO_TARGET_DIR),target)

.PHONY: test-dashboard deps-chromium dash-playwright

deps-chromium:
	@if [ -x /usr/bin/chromium ]; then :; else \
		echo "installing Chromium (apt-get install chromium)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

dash-playwright:
	@mkdir -p $(DASH_DIR)
	@if [ "$$(node -p "try{require('./$(DASH_DIR)/node_modules/playwright-core/package.json').version}catch(e){''}")" = "$(DASH_PLAYWRIGHT_VERSION)" ]; then :; else \
		echo '{"private": true}' > $(DASH_DIR)/package.json && \
		cd $(DASH_DIR) && npm install --no-audit --no-fund --silent playwright-core@$(DASH_PLAYWRIGHT_VERSION) </dev/null; \
	fi

test-dashboard: deps-chromium dash-playwright
	$(CARGO) build -p switchyard --bin switchyard
	$(CARGO) build -p switchyard-serve --example dashboard_seed
	SWITCHYARD_BIN=$(abspath $(DASH_TARGET))/debug/switchyard \
	DASH_SEED_BIN=$(abspath $(DASH_TARGET))/debug/examples/dashboard_seed \
	DASH_PLAYWRIGHT_DIR=$(abspath $(DASH_DIR)) \
	DASH_SCREENSHOTS=$(abspath target/dashboard-screenshots) \
	DASH_BULK_TASKS=$(DASH_BULK_TASKS) \
	  node tests/dashboard/dashboard.test.mjs </dev/null
