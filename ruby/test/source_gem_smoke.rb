# frozen_string_literal: true

# Smoke test of the source gem (`make test-ruby-source`): run from inside the
# GEM_HOME it was installed into with `gem install --local`, so the extension
# is the one compiled at install time, not the precompiled gem's.
require "switchyard"
require "tmpdir"

gem_home = File.expand_path(ARGV.fetch(0))
spec = Gem.loaded_specs.fetch("switchyard")
native = $LOADED_FEATURES.find { |f| f.end_with?("switchyard_native.so") }
abort "not the source gem: platform #{spec.platform}" unless spec.platform.to_s == "ruby"
abort "loaded from #{spec.full_gem_path}, not #{gem_home}" unless spec.full_gem_path.start_with?(gem_home)
abort "extension #{native.inspect} not from the installed gem" unless native&.start_with?(gem_home)

Dir.mktmpdir("switchyard-src-gem-") do |dir|
  store = "sqlite:#{File.join(dir, 'smoke.db')}"
  worker = Switchyard::Worker.new(store: store, concurrency: 2)
  worker.step("greet") { |input, ctx| { "hello" => ctx.checkpoint("who") { input["name"] } } }
  worker.start
  begin
    client = Switchyard::Client.new(store: store)
    id = client.spawn("greet", { "name" => "source gem" })
    result = client.result(id, timeout: 30)
    abort "unexpected result #{result.inspect}" unless result == { "hello" => "source gem" }
  ensure
    worker.stop
  end
end
puts "source gem #{Switchyard::VERSION} (platform ruby, Ruby #{RUBY_VERSION}): installed, compiled, ran a step"
