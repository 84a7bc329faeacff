# frozen_string_literal: true

require_relative "helper"

# The Ruby worker and client on the PostgreSQL store. The server is a
# throwaway one started by `switchyard dev-postgres` (initdb in a temporary
# directory, 127.0.0.1 on a free port) for this file's tests and stopped after
# the run. `make test-ruby` sets SWITCHYARD_CLI.
class TestPostgres < Minitest::Test
  include SwitchyardTest

  CLI = ENV["SWITCHYARD_CLI"]

  def self.server_url
    @server_url ||= begin
      io = IO.popen([CLI, "dev-postgres"], "r+")
      url = io.gets.to_s.strip
      raise "dev-postgres printed #{url.inspect}" unless url.start_with?("postgres://")

      Minitest.after_run do
        io.close_write # the server stops and removes its directory
        io.read
        io.close
      end
      url
    end
  end

  def setup
    super
    skip "SWITCHYARD_CLI is not set (make test-ruby sets it)" unless CLI
    @store = self.class.server_url
  end

  def test_blocks_events_and_replay_on_postgres
    w = make_worker(concurrency: 16)
    seen = Queue.new
    w.step("pg.double") do |input, _ctx|
      seen << input["n"]
      { n: input["n"] * 2 }
    end
    w.step("pg.approve") do |input, ctx|
      first = ctx.checkpoint("first") { input }
      { first: first, event: ctx.await_event("pg.approved:#{input}") }
    end
    w.start

    ids = client.spawn_many((0...200).map { |n| { handler: "pg.double", input: { n: n } } })
    assert_equal (0...200).map { |n| 2 * n }, ids.map { |id| client.result(id, timeout: WAIT)["n"] }
    assert_equal (0...200).to_a, Array.new(200) { seen.pop }.sort, "every task ran exactly once"
    assert seen.empty?

    waiting = client.spawn("pg.approve", "7")
    assert_equal true, client.emit("pg.approved:7", { ok: true })
    assert_equal({ "first" => "7", "event" => { "ok" => true } }, client.result(waiting, timeout: WAIT))
    assert_equal "completed", client.get(waiting)["state"]
  end

  def test_failures_and_bad_input_on_postgres
    w = make_worker
    w.step("pg.explode", retry: 1) { |_i, _c| raise ArgumentError, "kaboom on postgres" }
    w.start
    bad = client.spawn("pg.explode")
    done = client.wait(bad, timeout: WAIT)
    assert_equal "failed", done["state"]
    assert_includes JSON.generate(done["error"]), "kaboom on postgres"
    assert_raises(Switchyard::InvalidInput) { client.spawn("", {}) }
  end
end
