# frozen_string_literal: true

# The source gem's extension: cargo compiles the Magnus crate (binding/) and
# the Switchyard core it links (crates/), assembled here by `make
# ruby-source-gem`, against the Ruby running this script (rb-sys finds it
# through $RUBY and generates its bindings with libclang). It writes a
# Makefile for RubyGems: `make` builds, `make install` puts
# switchyard/switchyard_native.so where lib/switchyard.rb requires it.
#
# Needs the Rust toolchain (https://rustup.rs) and libclang. CARGO names
# cargo; CARGO_TARGET_DIR and CARGO_BUILD_TARGET are honoured (a CI run
# points them at its own build directory to reuse compiled dependencies).
require "mkmf"
require "rbconfig"

cargo = ENV.fetch("CARGO", "cargo")
unless find_executable(cargo)
  abort "switchyard: building the extension from source needs the Rust toolchain " \
        "(cargo, https://rustup.rs) and libclang; or install the precompiled gem for your platform"
end

here = File.expand_path(__dir__)
target_dir = ENV["CARGO_TARGET_DIR"] || File.join(here, "target")
triple = ENV["CARGO_BUILD_TARGET"]
out_dir = triple ? File.join(target_dir, triple, "release") : File.join(target_dir, "release")
so = RbConfig::CONFIG["DLEXT"]
built = File.join(out_dir, "libswitchyard_native.so")
# RubyGems points sitearchdir at its staging directory (its siteconf sets
# MAKEFILE_CONFIG); a plain `ruby extconf.rb && make install` uses Ruby's own.
sitearchdir = RbConfig::MAKEFILE_CONFIG["sitearchdir"]
sitearchdir = RbConfig::CONFIG["sitearchdir"] if sitearchdir.include?("$(")

File.write("Makefile", <<~MAKE)
  sitearchdir ?= #{sitearchdir}

  all:
  \tenv RUBY=#{RbConfig.ruby} #{cargo} build --release --manifest-path #{here}/Cargo.toml --target-dir #{target_dir} --lib
  \tcp #{built} switchyard_native.#{so}

  install: all
  \tmkdir -p $(sitearchdir)/switchyard
  \tcp switchyard_native.#{so} $(sitearchdir)/switchyard/switchyard_native.#{so}

  clean:
  \trm -f switchyard_native.#{so}
MAKE
