# frozen_string_literal: true

require_relative "helper"

# A reduced set of the suite with GC.stress on (a full GC at every
# allocation), to catch Ruby values the extension does not keep alive:
# conversions both ways, jobs and contexts handed to blocks, batches,
# decisions, durable operations and client calls.
class TestGcStress < Minitest::Test
  include SwitchyardTest

  def stressed
    GC.stress = true
    yield
  ensure
    GC.stress = false
  end

  def test_worker_and_client_under_gc_stress
    w = make_worker(threads: 2)
    w.step("echo") do |input, ctx|
      saved = ctx.checkpoint("copy") { { "input" => input, "tags" => %i[a b], "n" => 2**40, "f" => 1.5 } }
      [saved, ctx.task_id, ctx.headers]
    end
    w.batch("sum", max_batch: 4, linger: 0.01) { |items| items.map { |it| it.input["xs"].sum } }
    w.decision("plan") do |input, _ctx|
      Switchyard::Decision.create([Switchyard.step("part", handler: "echo", input: input),
                                   Switchyard.step("join", depends_on: ["part"])])
    end
    w.step("join") { |_i, ctx| ctx.dependency_results.keys }
    w.step("wait") { |input, ctx| ctx.await_event("go:#{input}") }
    w.step("fail", retry: 1) { raise Switchyard::PermanentError, "no" * 20 }
    stuck = Queue.new
    w.step("stuck") do
      stuck << :started
      sleep 60
    rescue Switchyard::Interrupted => e
      stuck << e.class
      raise
    end
    w.start
    stressed do
      ids = client.spawn_many(Array.new(3) { |i| { handler: "echo", input: { "k" => "v#{i}", "list" => [i, nil, true] } } })
      ids.each_with_index do |id, i|
        saved, task_id, headers = client.result(id, timeout: WAIT)
        assert_equal({ "k" => "v#{i}", "list" => [i, nil, true] }, saved["input"])
        assert_equal(%w[a b], saved["tags"])
        assert_equal 2**40, saved["n"]
        assert_equal id, task_id
        assert_equal({}, headers)
      end
      sums = client.spawn_many(Array.new(4) { |i| { handler: "sum", input: { xs: [i, i, i] } } })
      assert_equal [0, 3, 6, 9], sums.map { |id| client.result(id, timeout: WAIT) }
      assert_equal ["part"], client.result(client.spawn("plan", { "p" => 1 }), timeout: WAIT)
      waiting = client.spawn("wait", "x")
      client.emit("go:x", { "payload" => ["deep", { "er" => 1 }] })
      assert_equal({ "payload" => ["deep", { "er" => 1 }] }, client.result(waiting, timeout: WAIT))
      t = client.wait(client.spawn("fail"), timeout: WAIT)
      assert_equal "failed", t["state"]
      assert_equal "no" * 20, t["error"]["message"]
      assert_operator client.inspect(waiting)["checkpoints"].size, :>=, 1
      assert_raises(TypeError) { client.spawn("echo", Object.new) }
      blocked = client.spawn("stuck")
      assert_equal :started, pop(stuck)
      assert client.cancel(blocked)
      assert_equal Switchyard::Interrupted, pop(stuck)
      assert_equal "cancelled", client.wait(blocked, timeout: WAIT)["state"]
    end
  end

  def test_durable_operations_under_gc_stress
    w = make_worker(threads: 2)
    w.step("parent") do |input, ctx|
      outs = ctx.delegate_parallel(input["xs"].map { |x| ["child", { "x" => x }] })
      one = ctx.delegate("child", { "x" => 100 })
      ctx.sleep(0.01)
      ctx.emit_event("done:#{ctx.task_id}", { "sum" => outs.sum { |o| o["result"] } + one })
      { "outs" => outs.map { |o| o["result"] }, "one" => one, "spawned" => ctx.spawn("child", { "x" => 0 }).size }
    end
    w.step("child") { |input, _ctx| input["x"] * 2 }
    w.start
    stressed do
      id = client.spawn("parent", { "xs" => [1, 2, 3] }, headers: { "h" => "v" })
      assert_equal({ "outs" => [2, 4, 6], "one" => 200, "spawned" => 36 }, client.result(id, timeout: WAIT))
      ev = client.events.find { |e| e["name"] == "done:#{id}" }
      assert_equal({ "sum" => 212 }, ev["payload"])
      assert_operator client.inspect(id)["children"].size, :>=, 5
      assert_operator client.list(handler: "child").size, :>=, 5
    end
  end
end
