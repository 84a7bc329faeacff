# frozen_string_literal: true

require_relative "helper"

# A Ruby worker shares one SQLite file with the Rust CLI and with a Rust
# host process (the e2e test host). `make test-ruby` builds both and sets
# SWITCHYARD_CLI and SWITCHYARD_TESTHOST.
class TestCrossLanguage < Minitest::Test
  include SwitchyardTest

  CLI = ENV["SWITCHYARD_CLI"]
  TESTHOST = ENV["SWITCHYARD_TESTHOST"]

  def setup
    super
    skip "SWITCHYARD_CLI is not set (make test-ruby sets it)" unless CLI
  end

  def cli(*args, ok: true)
    assert File.executable?(CLI), "SWITCHYARD_CLI=#{CLI} is not executable"
    out, err, status = Timeout.timeout(60) { Open3.capture3(CLI, "--store", @store, *args) }
    assert status.success?, "switchyard #{args.join(' ')}: #{out}#{err}" if ok
    out
  end

  def test_cli_and_ruby_worker_share_a_store
    w = make_worker
    w.step("greet") { |input, _ctx| { greeting: "hello #{input['name']}" } }
    w.step("approve") { |input, ctx| ctx.await_event("approved:#{input}") }
    w.step("explode", retry: 1) { |_i, _c| raise ArgumentError, "kaboom from ruby" }
    w.start

    # The CLI spawns and waits; the Ruby worker serves.
    doc = JSON.parse(cli("--json", "spawn", "greet", "--input", '{"name": "ada"}', "--wait", "20"))
    assert_includes JSON.generate(doc), "hello ada"

    # A Ruby client spawns; the CLI emits the event the block awaits.
    tid = client.spawn("approve", "7")
    cli("emit", "approved:7", "--payload", '{"ok": true}')
    assert_equal({ "ok" => true }, client.result(tid, timeout: WAIT))

    # The Ruby backtrace appears in `tasks show`.
    bad = client.spawn("explode")
    assert_equal "failed", client.wait(bad, timeout: WAIT)["state"]
    shown = cli("tasks", "show", bad)
    assert_includes shown, "ArgumentError: kaboom from ruby"
    assert_match(/test_cross_language\.rb:\d+/, shown)

    # The CLI sees the Ruby host and its handlers.
    assert_includes cli("--json", "workers"), "greet"

    # The CLI cancels what Ruby spawned.
    idle = client.spawn("nobody.serves.this")
    cli("cancel", idle)
    assert_equal "cancelled", client.get(idle)["state"]
  end

  def test_ruby_step_delegates_to_a_rust_host_process
    skip "SWITCHYARD_TESTHOST is not set (make test-ruby sets it)" unless TESTHOST
    log = File.join(@dir, "runs.log")
    err = File.join(@dir, "testhost.err")
    out_r, out_w = IO.pipe
    host = Process.spawn(TESTHOST, "--store", @store, "--handlers", "work", "--log", log, out: out_w, err: err)
    out_w.close
    ready = Timeout.timeout(WAIT) { out_r.gets }
    assert_match(/\Aready /, ready.to_s, File.exist?(err) ? File.read(err) : "")

    w = make_worker
    w.step("ruby.parent") do |input, ctx|
      rust = ctx.delegate("work", { sleep_ms: 1 })
      { from_rust: rust, doubled: input["n"] * 2, ruby_pid: Process.pid }
    end
    w.start
    id = client.spawn("ruby.parent", { n: 21 })
    r = client.result(id, timeout: WAIT)
    assert_equal 42, r["doubled"]
    assert_equal host, r["from_rust"]["pid"], "the child ran in the Rust host process"
    assert_equal Process.pid, r["ruby_pid"]
    # And the other way round: the CLI spawns work for the Rust host while
    # the Ruby worker runs on the same file.
    doc = JSON.parse(cli("--json", "spawn", "work", "--input", "{}", "--wait", "20"))
    assert_includes JSON.generate(doc), host.to_s
  ensure
    if host
      Process.kill("TERM", host)
      Timeout.timeout(WAIT) { Process.wait(host) }
    end
  end
end
