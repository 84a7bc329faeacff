# frozen_string_literal: true

require_relative "helper"
require "pathname"

# Worker.from_config: the core's one configuration parser (switchyard.toml
# plus SWITCHYARD_* variables) gives a Ruby host its store and [host]
# settings, and refuses unknown keys and wrong types naming key and file.
class TestConfig < Minitest::Test
  include SwitchyardTest

  def setup
    super
    @saved_env = ENV.to_h.select { |k, _| k.start_with?("SWITCHYARD_") }
    @saved_env.each_key do |k|
      ENV.delete(k) if %w[SWITCHYARD_STORE SWITCHYARD_CONFIG].include?(k) || k.include?("__")
    end
  end

  def teardown
    ENV.keys.select { |k| k.start_with?("SWITCHYARD_") }.each { |k| ENV.delete(k) }
    @saved_env.each { |k, v| ENV[k] = v }
    super
  end

  def write(name, text)
    path = File.join(@dir, name)
    File.write(path, text)
    path
  end

  def test_from_config_uses_the_configured_store_and_host
    db = File.join(@dir, "configured.db")
    cfg = write("switchyard.toml", <<~TOML)
      [store]
      url = "sqlite:#{db}"

      [host]
      concurrency = 3
      lease = "5s"
      heartbeat = "1s"
      shutdown_grace = "1500ms"
    TOML
    w = Switchyard::Worker.from_config(Pathname.new(cfg))
    @workers << w
    assert_equal "sqlite:#{db}", w.store
    native = w.instance_variable_get(:@native)
    assert_equal 3, native.concurrency
    assert_equal 1.5, native.shutdown_grace
    assert_equal 3, w.instance_variable_get(:@threads_n)
    w.step("double") { |input, _ctx| input * 2 }
    w.start
    c = Switchyard::Client.new("sqlite:#{db}")
    assert_equal 42, c.result(c.spawn("double", 21), timeout: WAIT)
    w.stop
    assert File.exist?(db)
  end

  def test_from_config_reads_switchyard_config_and_environment_overrides
    db = File.join(@dir, "env.db")
    ENV["SWITCHYARD_CONFIG"] = write("c.toml", "[store]\nurl = \"sqlite:#{db}\"\n[host]\nconcurrency = 3\n")
    w = Switchyard::Worker.from_config
    assert_equal 3, w.instance_variable_get(:@native).concurrency
    assert_equal "sqlite:#{db}", w.store
    ENV["SWITCHYARD_HOST__CONCURRENCY"] = "5"
    ENV["SWITCHYARD_STORE"] = "memory"
    w = Switchyard::Worker.from_config(threads: 2)
    assert_equal 5, w.instance_variable_get(:@native).concurrency
    assert_equal 2, w.instance_variable_get(:@threads_n)
    assert_equal "memory", w.store
  end

  def test_from_config_refuses_unknown_keys_and_wrong_types
    cfg = write("bad.toml", "[host]\nconcurency = 3\n")
    e = assert_raises(Switchyard::ConfigError) { Switchyard::Worker.from_config(cfg) }
    assert_includes e.message, "host.concurency"
    assert_includes e.message, "bad.toml"

    cfg = write("type.toml", "[host]\nlease = \"whenever\"\n")
    e = assert_raises(Switchyard::ConfigError) { Switchyard::Worker.from_config(cfg) }
    assert_includes e.message, "host.lease"
    assert_includes e.message, "type.toml"

    ENV["SWITCHYARD_HOST__CONCURRENCY"] = "0"
    e = assert_raises(Switchyard::ConfigError) { Switchyard::Worker.from_config }
    assert_includes e.message, "SWITCHYARD_HOST__CONCURRENCY"
  end

  def test_from_config_errors_never_show_the_store_password
    cfg = write("pg.toml", "[store]\nurl = \"postgres://alice:s3cr3tpw@127.0.0.1:1/nope\"\n")
    w = Switchyard::Worker.from_config(cfg)
    w.step("x") { |input, _ctx| input }
    e = assert_raises(Switchyard::Error) { w.start }
    refute_includes e.message, "s3cr3tpw"
    assert_includes e.message, "alice"
  end

  # The process's log subscriber is global: each level runs in a child.
  def test_from_config_applies_log_level_unless_switchyard_log_is_set
    code = <<~RUBY
      require "switchyard"
      w = Switchyard::Worker.from_config(ARGV[0])
      w.step("x") { 1 }
      w.start
      w.stop
    RUBY
    script = ruby_script(code)
    run = lambda do |level, env = {}|
      cfg = write("log-#{level}.toml", "[store]\nurl = \"#{@store}\"\n\n[log]\nlevel = \"#{level}\"\n")
      _out, err, status = Open3.capture3(gem_env.merge("SWITCHYARD_LOG" => nil).merge(env), RbConfig.ruby, script, cfg)
      assert status.success?, err
      err
    end
    assert_match(/INFO switchyard_core::worker(::\w+)*: host started/, run.call("info"))
    refute_match(/host started/, run.call("warn"))
    refute_match(/host started/, run.call("info", "SWITCHYARD_LOG" => "warn"), "SWITCHYARD_LOG wins")

    cfg = write("loud.toml", "[log]\nlevel = \"loud\"\n")
    e = assert_raises(Switchyard::ConfigError) { Switchyard::Worker.from_config(cfg) }
    assert_includes e.message, "log.level"
    assert_includes e.message, "loud.toml"
  end
end
