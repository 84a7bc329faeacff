# The conformance suite (tests/conformance/): the scenarios of
# scenarios.json against a host process in each of the six languages, each
# package built and installed the way users install it (the wheel into
# target/venv-py, the npm package into target/node-scratch, the gem into
# target/ruby-gems, the C host linked against libswitchyard.a).
# Included from the root Makefile.

CONF_LANGS ?= rust,python-sync,python-async,node,ruby,c
CONF_C_HOST := $(C_OUT)/conformance_host

.PHONY: test-conformance

test-conformance: python-wheel node-package ruby-gem c-lib
	mkdir -p $(C_OUT)
	$(C_CC) $(C_FLAGS) tests/conformance/hosts/c_host.c $(C_LIB_DIR)/libswitchyard.a $(C_STATIC_LIBS) -o $(CONF_C_HOST)
	SWITCHYARD_CONFORMANCE=$(CONF_LANGS) \
	SWITCHYARD_PYTHON=$(PY_VENV_ABS)/bin/python \
	SWITCHYARD_NODE_DIR=$(NODE_SCRATCH) \
	SWITCHYARD_RUBY_GEMS=$(RB_GEM_HOME) \
	SWITCHYARD_C_HOST=$(abspath $(CONF_C_HOST)) \
	  $(CARGO) test -p switchyard-e2e --test conformance -- --nocapture
