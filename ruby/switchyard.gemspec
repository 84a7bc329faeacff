# frozen_string_literal: true

require_relative "lib/switchyard/version"

# Two gems from one spec (`make ruby-gem`, mk/ruby.mk):
#
# - the precompiled platform gem (default): the native extension is built by
#   cargo and copied to lib/switchyard/switchyard_native.so before
#   `gem build`, so installing needs no compiler and no gem server. It is
#   built for one Ruby ABI, the building Ruby's minor version.
# - the source gem (SWITCHYARD_GEM=source, platform `ruby`): the Rust sources
#   of the extension and of the core it links (assembled into ext/ by
#   mk/ruby.mk) are compiled by cargo with rb-sys at `gem install` time, for
#   whatever Ruby installs it (Magnus supports 3.1 to 4.0); it needs the Rust
#   toolchain and libclang.
source = ENV["SWITCHYARD_GEM"] == "source"

Gem::Specification.new do |s|
  s.name = "switchyard"
  s.version = Switchyard::VERSION
  s.summary = "Durable worker host with a Rust core: Ruby block handlers"
  s.description = "Switchyard runs durable steps (checkpoints, events, sleeps, delegation) " \
                  "dispatched by a Rust core inside the Ruby process. Tasks and their state live " \
                  "in an embedded SQLite file, in PostgreSQL or in memory; handlers in Ruby, " \
                  "Python, Node.js, Rust and C can serve one store."
  s.authors = ["Switchyard contributors"]
  s.license = "Apache-2.0"
  s.homepage = "https://github.com/switchyard/switchyard"
  s.metadata = {
    "homepage_uri" => s.homepage,
    "source_code_uri" => "https://github.com/switchyard/switchyard",
    "changelog_uri" => "https://github.com/switchyard/switchyard/blob/main/CHANGELOG.md",
    "bug_tracker_uri" => "https://github.com/switchyard/switchyard/issues",
    "documentation_uri" => "https://github.com/switchyard/switchyard/tree/main/ruby#readme",
  }
  docs = ["README.md", "LICENSE", "CHANGELOG.md"]
  s.extra_rdoc_files = docs
  common = Dir["lib/**/*.rb"] + Dir["sig/**/*.rbs"] + docs
  s.require_paths = ["lib"]
  if source
    s.platform = Gem::Platform::RUBY
    s.required_ruby_version = ">= 3.1", "< 4.1"
    s.extensions = ["ext/switchyard_native/extconf.rb"]
    s.files = common + Dir["ext/**/*"].select { |f| File.file?(f) }.reject { |f| f.include?("/target/") }
  else
    # The platform the extension was built for (mk/ruby.mk passes it from
    # TARGET, e.g. aarch64-linux); the building Ruby's by default.
    s.platform = ENV["SWITCHYARD_GEM_PLATFORM"] ? Gem::Platform.new(ENV["SWITCHYARD_GEM_PLATFORM"]) : Gem::Platform::CURRENT
    s.required_ruby_version = "~> #{RUBY_VERSION[/\A\d+\.\d+/]}.0"
    s.files = common + ["lib/switchyard/switchyard_native.so"]
  end
end
