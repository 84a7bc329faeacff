# frozen_string_literal: true

require_relative "helper"

class TestDurable < Minitest::Test
  include SwitchyardTest

  def test_checkpoint_runs_once_across_retries
    w = make_worker
    charges = Queue.new
    w.step("charge", retry: { max_attempts: 3, initial_backoff: 0.01 }) do |input, ctx|
      receipt = ctx.checkpoint("charge") do
        charges << ctx.attempt
        { receipt: "R-#{input['order']}", amount: 9.5 }
      end
      raise IOError, "mail server down" if ctx.attempt == 1

      receipt
    end
    w.start
    id = client.spawn("charge", { order: 7 })
    # The first run's value already has string keys: replays agree with it.
    assert_equal({ "receipt" => "R-7", "amount" => 9.5 }, client.result(id, timeout: WAIT))
    assert_equal 1, charges.size
    assert_equal 1, charges.pop
    keys = client.inspect(id)["checkpoints"]
    assert_equal ["charge/charge"], keys.map { |c| c["key"] }.grep(%r{charge/charge})
  end

  def test_repeated_checkpoint_names_are_numbered_and_need_a_block
    w = make_worker
    w.step("twice") do |_i, ctx|
      a = ctx.checkpoint("n") { 1 }
      b = ctx.checkpoint("n") { 2 }
      begin
        ctx.checkpoint("n")
      rescue ArgumentError => e
        [a, b, e.message]
      end
    end
    w.start
    a, b, msg = client.result(client.spawn("twice"), timeout: WAIT)
    assert_equal [1, 2], [a, b]
    assert_match(/needs a block/, msg)
  end

  def test_await_event_emitted_before_and_after_the_wait
    w = make_worker
    runs = Queue.new
    w.step("ship") do |input, ctx|
      runs << ctx.attempt
      paid = ctx.await_event("paid:#{input['order']}", timeout: 60)
      delivered = ctx.await_event("delivered:#{input['order']}")
      { paid: paid, delivered: delivered }
    end
    w.start
    assert client.emit("paid:1", { amount: 3 })
    refute client.emit("paid:1", { amount: 999 }), "first write wins"
    id = client.spawn("ship", { order: 1 })
    wait_for("the step suspends on the delivery event") do
      s = step_of(id)
      s["state"] == "suspended" && s.dig("wait", "event") == "delivered:1"
    end
    client.emit("delivered:1", "signed")
    assert_equal({ "paid" => { "amount" => 3 }, "delivered" => "signed" }, client.result(id, timeout: WAIT))
    assert_operator runs.size, :>=, 2, "the step resumed by replay"
  end

  def test_await_timeout_is_raised_and_replayed
    w = make_worker
    w.step("approval") do |_i, ctx|
      begin
        ctx.await_event("approved", timeout: 0.05)
      rescue Switchyard::AwaitTimeout => e
        first = e.message
      end
      # A replay (after this checkpointed timeout) takes the same path.
      seen = ctx.checkpoint("attempt") { ctx.attempt }
      { timed_out: first, checkpointed_at: seen }
    end
    w.step("escape") { |_i, ctx| ctx.await_event("never", timeout: 0.01) }
    w.start
    r = client.result(client.spawn("approval"), timeout: WAIT)
    assert_match(/timed out waiting for event `approved`/, r["timed_out"])
    t = client.wait(client.spawn("escape"), timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_match(/timed out waiting for event `never`/, t["error"]["message"])
  end

  def test_suspend_is_not_swallowed_by_a_bare_rescue
    w = make_worker
    w.step("careless") do |_i, ctx|
      begin
        ctx.await_event("go")
      rescue StandardError
        "swallowed"
      end
    end
    w.start
    id = client.spawn("careless")
    wait_for("suspended") { step_of(id)["state"] == "suspended" }
    client.emit("go", 1)
    assert_equal 1, client.result(id, timeout: WAIT)
  end

  def test_durable_sleep_and_sleep_until
    w = make_worker
    w.step("nap") do |_i, ctx|
      ctx.sleep(0.05)
      # The wake-up time must be the same on every replay: checkpoint it.
      at = ctx.checkpoint("wake at") { ((Time.now.to_r + 0.05) * 1000).to_i }
      ctx.sleep_until(at)
      ctx.attempt
    end
    w.start
    id = client.spawn("nap")
    assert_kind_of Integer, client.result(id, timeout: WAIT)
    keys = client.inspect(id)["checkpoints"].map { |c| c["key"] }
    assert(keys.any? { |k| k.start_with?("$sleep:nap") }, keys.inspect)
  end

  def test_spawn_delegate_and_delegate_parallel
    w = make_worker
    w.step("report") do |input, ctx|
      outcomes = ctx.delegate_parallel(input["regions"].map { |r| ["region.total", { region: r }] })
      totals = {}
      failures = []
      outcomes.zip(input["regions"]).each do |o, r|
        o["state"] == "completed" ? totals[r] = o["result"] : failures << r
      end
      rate = ctx.delegate("fx.rate", { to: "EUR" })
      audit = ctx.spawn("audit", { totals: totals })
      { totals: totals, failures: failures, eur: totals.values.sum * rate, audit: audit }
    end
    w.step("region.total", retry: 1) do |input, _c|
      rows = { "north" => [1, 2], "south" => [3] }[input["region"]]
      raise Switchyard::PermanentError, "no ledger for #{input['region']}" unless rows

      rows.sum
    end
    w.step("fx.rate") { 0.5 }
    w.step("audit") { |i, _c| i }
    w.start
    id = client.spawn("report", { regions: %w[north south atlantis] }, response_event: "report.ready")
    r = client.result(id, timeout: WAIT)
    assert_equal({ "north" => 3, "south" => 3 }, r["totals"])
    assert_equal ["atlantis"], r["failures"]
    assert_equal 3.0, r["eur"]
    assert_equal "completed", client.wait(r["audit"], timeout: WAIT)["state"]
    client.emit("order.1", 1)
    client.emit("order.2", 2)
    assert_equal %w[order.1 order.2], client.events(name: "order.").map { |e| e["name"] }.sort
    assert_equal ["order.2"], client.events(limit: 1, name: :"order.").map { |e| e["name"] }, "newest first"
    ev = client.events.find { |e| e["name"] == "report.ready" }
    refute_nil ev, "the response event was emitted"
    children = client.inspect(id)["children"]
    assert_operator children.size, :>=, 4
  end

  def test_failed_delegation_fails_the_parent
    w = make_worker
    w.step("parent") { |_i, ctx| ctx.delegate("child") }
    w.step("child", retry: 1) { raise Switchyard::PermanentError, "child broke" }
    w.start
    t = client.wait(client.spawn("parent"), timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_match(/child broke/, t["error"]["message"])
  end

  def test_emit_event_and_context_fields
    w = make_worker
    w.step("notify") do |_i, ctx|
      {
        stored: ctx.emit_event("note:#{ctx.task_id}", { by: "ruby" }),
        again: ctx.emit("note:#{ctx.task_id}", {}),
        headers: ctx.headers, priority: ctx.priority, time_left: ctx.time_left.is_a?(Float),
        cancelled: ctx.cancelled?, step_id: ctx.step_id.size, heartbeat: ctx.heartbeat.nil?
      }
    end
    w.start
    id = client.spawn("notify", nil, headers: { "trace" => "t-1" }, priority: 3)
    r = client.result(id, timeout: WAIT)
    assert_equal({ "stored" => true, "again" => false, "headers" => { "trace" => "t-1" }, "priority" => 3,
                   "time_left" => true, "cancelled" => false, "step_id" => 36, "heartbeat" => true }, r)
    assert_equal({ "by" => "ruby" }, client.events.find { |e| e["name"] == "note:#{id}" }["payload"])
  end

  def test_cancelling_a_running_step_is_seen_by_the_block
    w = make_worker
    started = Queue.new
    stopped = Queue.new
    w.step("scan", timeout: 60) do |_i, ctx|
      started << true
      begin
        sleep 0.005 until ctx.cancelled?
        stopped << [:cooperative, ctx.cancelled?]
      rescue Switchyard::Interrupted
        # Push cancellation may reach the thread first.
        stopped << [:interrupted, ctx.cancelled?]
      end
      raise Switchyard::Cancelled, "scan cancelled"
    end
    w.start
    id = client.spawn("scan")
    pop(started)
    assert client.cancel(id)
    assert_equal "cancelled", client.wait(id, timeout: WAIT)["state"]
    how, flag = pop(stopped)
    assert_includes %i[cooperative interrupted], how
    assert flag, "ctx.cancelled? is true once the task was cancelled"
  end

  def test_cancelling_interrupts_a_blocked_block
    w = make_worker(threads: 1)
    started = Queue.new
    seen = Queue.new
    w.step("stuck", timeout: 120) do |_i, _ctx|
      started << true
      begin
        sleep 60 # blocked, never checks ctx.cancelled?
      rescue Switchyard::Cancelled => e
        seen << e
        raise
      end
    end
    w.step("after") { |i, _c| i }
    w.start
    id = client.spawn("stuck")
    pop(started)
    assert client.cancel(id)
    e = pop(seen)
    assert_kind_of Switchyard::Interrupted, e
    assert_match(/cancelled/, e.message)
    assert_equal "cancelled", client.wait(id, timeout: WAIT)["state"]
    # The (single) serving thread survived and serves the next step.
    assert_equal "next", client.result(client.spawn("after", "next"), timeout: WAIT)
  end

  def test_a_timed_out_block_is_interrupted_and_retried
    w = make_worker
    interrupted = Queue.new
    w.step("slow", timeout: 0.2, retry: { max_attempts: 2, initial_backoff: 0.01 }) do |_i, ctx|
      if ctx.attempt == 1
        begin
          sleep 60
        rescue Switchyard::Interrupted
          interrupted << ctx.attempt
          raise
        end
      end
      "attempt #{ctx.attempt}"
    end
    w.start
    id = client.spawn("slow")
    assert_equal "attempt 2", client.result(id, timeout: WAIT)
    assert_equal 1, pop(interrupted)
  end

  def test_cancel_cascades_to_a_suspended_step_and_its_children
    w = make_worker
    w.step("watch") do |_i, ctx|
      ctx.spawn("idle.child")
      ctx.await_event("restock")
    end
    w.start
    id = client.spawn("watch")
    wait_for("suspended with a child") { step_of(id)["state"] == "suspended" && !client.inspect(id)["children"].empty? }
    assert client.cancel(id, cascade: true)
    assert_equal "cancelled", client.wait(id, timeout: WAIT)["state"]
    client.inspect(id)["children"].each do |c|
      assert_equal "cancelled", client.wait(c["id"], timeout: WAIT)["state"]
    end
    refute client.cancel(id), "already finished"
  end

  # Issue item 5: negative, NaN, infinite and absurd (1e20 s panicked in
  # Rust) timeouts and sleeps raise Switchyard::InvalidInput.
  def test_bad_durations_raise_invalid_input
    w = make_worker
    w.step("bad.durations") do |_i, ctx|
      out = [-1, Float::NAN, Float::INFINITY, 1e20].map do |t|
        ctx.await_event("never", timeout: t)
        "no error"
      rescue Switchyard::InvalidInput => e
        e.message
      end
      begin
        ctx.sleep(1e20)
        out << "no error"
      rescue Switchyard::InvalidInput => e
        out << e.message
      end
      out
    end
    w.start
    out = client.result(client.spawn("bad.durations"), timeout: WAIT)
    assert_equal 5, out.size, out.inspect
    out[0, 3].each { |m| assert_match(/await_event timeout must be a non-negative number/, m) }
    assert_match(/await_event timeout must be at most 100 years/, out[3])
    assert_match(/sleep duration must be at most 100 years/, out[4])
  end

  # Issue 20: a step that awaits 50 events, or sleeps 50 times, completes
  # under the default retry policy (5 attempts) on attempt 1.
  def test_waiting_fifty_times_costs_no_attempt
    w = make_worker
    w.step("approvals") do |input, ctx|
      sum = (0...50).sum { |i| ctx.await_event("#{input['prefix']}-#{i}") }
      { sum: sum, attempt: ctx.attempt, run: ctx.run }
    end
    w.step("naps") do |_i, ctx|
      50.times { ctx.sleep(0.02) }
      { attempt: ctx.attempt, run: ctx.run }
    end
    w.start
    sleeper = client.spawn("naps", {})
    id = client.spawn("approvals", { prefix: "fifty" })
    50.times do |i|
      wait_for("suspension #{i + 1}") do
        s = step_of(id)
        s["state"] == "suspended" && s["run"] == i + 1 && s["attempt"].zero?
      end
      client.emit("fifty-#{i}", 1)
    end
    assert_equal({ "sum" => 50, "attempt" => 1, "run" => 51 }, client.result(id, timeout: WAIT))
    out = client.result(sleeper, timeout: WAIT)
    assert_equal 1, out["attempt"]
    # A sleep whose time has already come returns without suspending.
    assert_includes 2..51, out["run"]
  end

  def test_spawn_with_response_event_and_await_it
    w = make_worker
    w.step("child", retry: 1) do |input, _ctx|
      raise Switchyard::PermanentError, "child says no" if input["fail"]

      input["x"] * 2
    end
    w.step("parent") do |input, ctx|
      name = "child.done:#{ctx.task_id}"
      child = ctx.spawn("child", input, response_event: name)
      { "child" => child, "event" => ctx.await_event(name, timeout: 30) }
    end
    w.step("bad_name") do |_input, ctx|
      ctx.spawn("child", { x: 1 }, response_event: "")
      "accepted"
    rescue Switchyard::InvalidInput => e
      "refused: #{e.message}"
    end
    w.start
    r = client.result(client.spawn("parent", { x: 21 }), timeout: WAIT)
    assert_equal({ "task_id" => r["child"], "state" => "completed", "result" => 42, "error" => nil }, r["event"])
    r = client.result(client.spawn("parent", { fail: true }), timeout: WAIT)
    assert_equal [r["child"], "failed", nil], r["event"].values_at("task_id", "state", "result")
    assert_match(/child says no/, r["event"]["error"]["message"])
    assert_match(/\Arefused: .*response_event/, client.result(client.spawn("bad_name", {}), timeout: WAIT))
  end

  def test_set_status_routes_and_refuses_a_bad_status
    w = make_worker
    w.decision("plan") do |input, _ctx|
      Switchyard::Decision.create(
        [Switchyard.step("check", input: input, routes: { late: [Switchyard.step("chase")] })]
      )
    end
    w.step("check") do |_input, ctx|
      bad = begin
        ctx.set_status("")
        "accepted"
      rescue Switchyard::InvalidInput => e
        e.message
      end
      ctx.set_status(:late)
      { "bad" => bad }
    end
    w.step("chase") { |_input, ctx| ctx.dependency_results }
    w.start
    id = client.spawn("plan", {})
    r = client.result(id, timeout: WAIT)
    assert_match(/status/, r["check"]["bad"])
    steps = client.inspect(id)["steps"].to_h { |s| [s["name"], s] }
    assert_equal "late", steps["check"]["status"]
    assert_equal ["late"], steps["check"]["routes"].keys
    assert_equal "completed", steps["chase"]["state"]
  end
end
