# frozen_string_literal: true

require_relative "helper"

class TestClient < Minitest::Test
  include SwitchyardTest

  def test_spawn_options_and_idempotency
    a = client.spawn("nobody", { x: 1 }, idempotency_key: "order-1", priority: 5, headers: { "tenant" => "t1" })
    b = client.spawn("nobody", { x: 2 }, idempotency_key: "order-1")
    assert_equal a, b
    t = client.get(a)
    assert_equal({ "x" => 1 }, t["input"])
    assert_equal 5, t["priority"]
    assert_equal({ "tenant" => "t1" }, t["headers"])
    later = client.spawn("nobody", nil, run_at: Time.now + 3600)
    assert_operator client.inspect(later)["steps"][0]["run_at"], :>, (Time.now.to_f * 1000).to_i + 3_000_000
  end

  def test_spawn_many_validates_everything_first
    ids = client.spawn_many([{ handler: "h", input: 1 }, { "handler" => "h", "input" => 2, "priority" => 1 }])
    assert_equal 2, ids.uniq.size
    before = client.list.size
    e = assert_raises(Switchyard::InvalidInput) { client.spawn_many([{ handler: "ok" }, { handler: "" }]) }
    assert_match(/task #1: handler must not be empty/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { client.spawn_many([{ handler: "ok" }, { handler: 1 }]) }
    assert_match(/task #1: `handler` must be a string/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { client.spawn_many([{ handler: "ok", colour: "red" }]) }
    assert_match(/task #0: unknown key `colour`/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { client.spawn_many(["nope"]) }
    assert_match(/task #0 must be an object/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { client.spawn_many([{ handler: "h", parent: "x" }]) }
    assert_match(/`parent`/, e.message)
    assert_equal before, client.list.size, "nothing was spawned"
    assert_equal [], client.spawn_many([])
    later, keyed = client.spawn_many([
      { handler: :h, run_at: Time.now + 3600, headers: { "k" => "v" } },
      { handler: "h", idempotency_key: "once", response_event: "h.done" }
    ])
    assert_operator client.inspect(later)["steps"][0]["run_at"], :>, (Time.now.to_f * 1000).to_i + 3_000_000
    assert_equal({ "k" => "v" }, client.get(later)["headers"])
    assert_equal keyed, client.spawn_many([{ handler: "h", idempotency_key: "once" }]).first
    e = assert_raises(Switchyard::InvalidInput) { client.spawn_many([{ input: 1 }]) }
    assert_match(/task #0: `handler` is missing/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { client.spawn_many([{ handler: "h", run_at: "soon" }]) }
    assert_match(/`run_at` must be epoch milliseconds/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { client.spawn("h", run_at: "soon") }
    assert_match(/`run_at` must be epoch milliseconds/, e.message)
    e = assert_raises(TypeError) { client.spawn_many([{ handler: "h" }, { 1 => "h" }]) }
    assert_match(/task #1: keys must be strings or symbols, not Integer/, e.message)
  end

  def test_bad_input_is_named
    e = assert_raises(TypeError) { client.spawn("h", { when: Time.now }) }
    assert_match(/input: an object of class Time is not JSON-serialisable/, e.message)
    e = assert_raises(TypeError) { client.spawn("h", { 1 => "a" }) }
    assert_match(/hash keys must be strings or symbols, not Integer/, e.message)
    e = assert_raises(RangeError) { client.spawn("h", 2**70) }
    assert_match(/does not fit in 64 bits/, e.message)
    e = assert_raises(RangeError) { client.emit("e", Float::NAN) }
    assert_match(/not valid JSON/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { client.get("not-a-uuid") }
    assert_match(/not-a-uuid/, e.message)
    assert_raises(Switchyard::NotFound) { client.get("01a208f4-466c-717c-9c51-3d9ce0d1d159") }
    e = assert_raises(Switchyard::InvalidInput) { client.emit("", 1) }
    assert_match(/event name must not be empty/, e.message)
    small = Switchyard::Client.new(store: @store, max_payload_bytes: 64)
    e = assert_raises(Switchyard::PayloadTooLarge) { small.spawn("h", "x" * 100) }
    assert_match(/limit is 64 bytes/, e.message)
    assert_kind_of Switchyard::InvalidInput, e
    e = assert_raises(Switchyard::ConfigError) { Switchyard::Client.new(store: "nosuch://x") }
    assert_match(/nosuch/, e.message)
    # A worker with a store URL that cannot work fails when it is made.
    Dir.mktmpdir do |dir|
      [["sqlite:#{dir}/no/such/dir/x.db", "directory `#{dir}/no/such/dir` does not exist"],
       ["mysql://u:s3cr3t@h/db", "unrecognised store URL `mysql://u:***@h/db`"],
       ["sqlite:x.db?synchronous=sometimes", "synchronous"]].each do |store, says|
        e = assert_raises(Switchyard::ConfigError) { Switchyard::Worker.new(store: store) }
        assert_includes e.message, says
        refute_includes e.message, "s3cr3t"
      end
    end
  end

  def test_result_timeout_failure_cancel_retry_list_inspect
    id = client.spawn("unserved", { n: 1 })
    e = assert_raises(Switchyard::TimeoutError) { client.result(id, timeout: 0.05) }
    assert_match(/still \w+ after 50 ms/, e.message)
    assert client.cancel(id)
    assert_equal "cancelled", client.get(id)["state"]
    e = assert_raises(Switchyard::TaskCancelled) { client.result(id, timeout: 1) }
    assert_match(/cancelled/, e.message)
    assert_nil client.retry(id)
    refute_equal "cancelled", client.get(id)["state"]
    assert_raises(Switchyard::Conflict) { client.retry(id) }
    listed = client.list(handler: "unserved")
    assert_equal [id], listed.map { |t| t["id"] }
    assert_equal [], client.list(state: :completed)
    assert_raises(Switchyard::InvalidInput) { client.list(state: "sleepy") }
    d = client.inspect(id)
    assert_equal %w[checkpoints children steps task], d.keys.sort
    assert_match(/Switchyard::Client store=sqlite:/, client.inspect)
    assert_equal 1, client.count_steps.values.sum
  end

  def test_result_of_a_served_task_and_workers
    w = make_worker
    w.step("echo") { |i, _c| i }
    w.start
    id = client.spawn("echo", [1, "two", { "three" => 3.0 }])
    assert_equal [1, "two", { "three" => 3.0 }], client.result(id, timeout: WAIT)
    assert_equal "completed", client.wait(id, timeout: WAIT)["state"]
    hosts = client.workers
    assert_equal 1, hosts.size
    assert_equal ["echo"], hosts[0]["handlers"]
    assert_equal Process.pid, hosts[0]["pid"]
  end

  def test_default_store_comes_from_the_environment
    old = ENV["SWITCHYARD_STORE"]
    ENV["SWITCHYARD_STORE"] = @store
    assert_equal @store, Switchyard::Client.new.store
    assert_equal @store, Switchyard::Worker.new.store
  ensure
    ENV["SWITCHYARD_STORE"] = old
  end

  def test_await_event_from_outside_a_task
    w = make_worker
    w.step("answer") { |input, _ctx| { answer: input["q"] } }
    w.start
    waiter = Thread.new { client.await_event("reply.rb", timeout: WAIT) }
    sleep 0.05
    id = client.spawn("answer", { q: 7 }, response_event: "reply.rb")
    reply = waiter.value
    assert_equal id, reply["task_id"]
    assert_equal "completed", reply["state"]
    assert_equal({ "answer" => 7 }, reply["result"])
    assert_nil reply["error"]
    client.emit("plain.rb", { n: 1 })
    client.emit("plain.rb", { n: 2 })
    assert_equal({ "n" => 1 }, client.await_event("plain.rb", timeout: 5))
    e = assert_raises(Switchyard::TimeoutError) { client.await_event("never.rb", timeout: 0.2) }
    assert_match(/`never.rb`/, e.message)
    assert_raises(Switchyard::InvalidInput) { client.await_event("", timeout: 1) }
  end
end
