# frozen_string_literal: true

require_relative "lib/switchyard/version"

# A precompiled platform gem: the native extension is built by cargo
# (`make ruby-gem`) and copied to lib/switchyard/switchyard_native.so
# before `gem build`, so installing needs no compiler and no gem server.
Gem::Specification.new do |s|
  s.name = "switchyard"
  s.version = Switchyard::VERSION
  s.summary = "Durable worker host with a Rust core: Ruby block handlers"
  s.description = "Switchyard runs durable steps (checkpoints, events, sleeps, delegation) " \
                  "dispatched by a Rust core inside the Ruby process."
  s.authors = ["Switchyard"]
  s.license = "Apache-2.0"
  s.platform = Gem::Platform::CURRENT
  s.required_ruby_version = "~> #{RUBY_VERSION[/\A\d+\.\d+/]}.0"
  s.files = Dir["lib/**/*.rb"] + ["lib/switchyard/switchyard_native.so"] + Dir["sig/**/*.rbs"]
  s.require_paths = ["lib"]
end
