# frozen_string_literal: true

# Shared by every test file. The tests exercise the installed gem: `make
# test-ruby` runs them from inside the private GEM_HOME, and this file checks
# that `require "switchyard"` loaded the gem from there, not ruby/lib.
require "minitest/autorun"
require "switchyard"
require "tmpdir"
require "fileutils"
require "json"
require "open3"
require "timeout"
require "rbconfig"

spec = Gem.loaded_specs["switchyard"]
native = $LOADED_FEATURES.find { |f| f.end_with?("switchyard_native.so") }
unless spec && native&.start_with?(spec.full_gem_path)
  abort "switchyard was not loaded from an installed gem (spec=#{spec&.full_gem_path.inspect}, native=#{native.inspect})"
end
if ENV["GEM_HOME"] && !spec.full_gem_path.start_with?(File.expand_path(ENV["GEM_HOME"]))
  abort "switchyard was loaded from #{spec.full_gem_path}, not from GEM_HOME=#{ENV['GEM_HOME']}"
end

module SwitchyardTest
  WAIT = 30 # seconds: an upper bound for waits, never an expectation

  def setup
    super
    @dir = Dir.mktmpdir("switchyard-rb-")
    @store = "sqlite:#{File.join(@dir, 'test.db')}"
    @workers = []
  end

  def teardown
    @workers.each { |w| w.stop if w.running? }
    FileUtils.rm_rf(@dir)
    super
  end

  def make_worker(**kw)
    w = Switchyard::Worker.new(store: @store, concurrency: 8, threads: 4, shutdown_grace: 2, lease: 5, **kw)
    @workers << w
    w
  end

  def client
    @client ||= Switchyard::Client.new(store: @store)
  end

  # Pops from +q+, failing the test after +timeout+ seconds.
  def pop(q, timeout = WAIT)
    Timeout.timeout(timeout) { q.pop }
  rescue Timeout::Error
    flunk "nothing arrived within #{timeout} s"
  end

  # Waits for a condition checked against the store, with a deadline.
  def wait_for(what, timeout = WAIT)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      v = yield
      return v if v
      flunk "#{what}: not reached within #{timeout} s" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
      sleep 0.01
    end
  end

  def step_of(task_id, index = 0)
    client.inspect(task_id)["steps"][index]
  end

  def gem_env
    { "GEM_HOME" => ENV["GEM_HOME"], "GEM_PATH" => nil, "RUBYLIB" => nil, "RUBYOPT" => nil }
  end

  # Runs a Ruby script in a child process with the installed gem.
  def ruby_script(code)
    path = File.join(@dir, "script_#{rand(1 << 30)}.rb")
    File.write(path, code)
    path
  end
end
