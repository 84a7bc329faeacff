# frozen_string_literal: true

require_relative "helper"

# The error model (README "Vocabulary"): what a client's wait raises, what
# a handler's exception does to its step, and durable control flow passing
# through Ruby without conversion.
class TestProtocol < Minitest::Test
  include SwitchyardTest

  class CardDeclined < Switchyard::PermanentError; end

  def test_task_failed_carries_the_recorded_error
    w = make_worker
    w.step("perm", retry: 5) { |_i, _c| raise CardDeclined, "card declined" }
    w.start
    id = client.spawn("perm")
    e = assert_raises(Switchyard::TaskFailed) { client.result(id, timeout: WAIT) }
    assert_kind_of Switchyard::Error, e
    assert_equal id, e.task_id
    assert_equal "permanent", e.kind, "a subclass of PermanentError is permanent"
    assert_equal 1, e.attempt, "never retried"
    assert_equal "card declined", e.error_message
    assert_equal "task #{id} failed on attempt 1: permanent: card declined", e.message
    assert_match(/TestProtocol::CardDeclined: card declined/, e.traceback)
    assert_match(/test_protocol\.rb:\d+/, e.traceback)
  end

  def test_task_failed_after_retries_names_the_last_attempt
    w = make_worker
    w.step("div", retry: { max_attempts: 2, initial_backoff: 0.01 }) { |i, _c| 10 / i }
    w.start
    e = assert_raises(Switchyard::TaskFailed) { client.result(client.spawn("div", 0), timeout: WAIT) }
    assert_equal "retryable", e.kind
    assert_equal 2, e.attempt
    assert_match(/ZeroDivisionError: divided by 0/, e.message)
  end

  def test_task_cancelled_and_client_timeout
    id = client.spawn("unserved")
    e = assert_raises(Switchyard::TimeoutError) { client.result(id, timeout: 0.05) }
    assert_match(/still \w+ after 50 ms/, e.message)
    refute_kind_of Switchyard::AwaitTimeout, e
    assert_raises(Switchyard::TimeoutError) { client.wait(id, timeout: 0.05) }
    assert client.cancel(id)
    e = assert_raises(Switchyard::TaskCancelled) { client.result(id, timeout: WAIT) }
    assert_equal id, e.task_id
    assert_match(/cancelled/, e.message)
    refute_kind_of Switchyard::TaskFailed, e
  end

  def test_await_timeout_is_not_a_client_timeout
    refute_same Switchyard::AwaitTimeout, Switchyard::TimeoutError
    refute Switchyard::AwaitTimeout <= Switchyard::TimeoutError
    refute Switchyard::TimeoutError <= Switchyard::AwaitTimeout
    w = make_worker
    seen = Queue.new
    w.step("waits") do |_i, ctx|
      ctx.await_event("never", timeout: 0.01)
    rescue Switchyard::AwaitTimeout => e
      seen << [e.class, e.event, e.is_a?(Switchyard::TimeoutError)]
      "caught"
    end
    w.start
    assert_equal "caught", client.result(client.spawn("waits"), timeout: WAIT)
    assert_equal [Switchyard::AwaitTimeout, "never", false], pop(seen)
  end

  def test_a_hand_raised_suspend_fails_its_step_with_the_cores_message
    w = make_worker
    w.step("fake", retry: 5) { |_i, _c| raise Switchyard::Suspend, "by hand" }
    w.step("ok") { |_i, _c| 1 }
    w.start
    id = client.spawn("fake")
    e = assert_raises(Switchyard::TaskFailed) { client.result(id, timeout: WAIT) }
    assert_equal "permanent", e.kind
    assert_equal 1, e.attempt
    assert_match(/raised Suspend but no context call asked it to/, e.message)
    assert_equal 1, client.result(client.spawn("ok"), timeout: WAIT), "only its own step failed"
  end

  def test_fifty_suspensions_in_a_row
    w = make_worker
    w.step("waits") do |_i, ctx|
      50.times.sum { |i| ctx.await_event("go-#{i}") }
    end
    w.start
    id = client.spawn("waits")
    50.times do |i|
      wait_for("run #{i + 1} suspended") do
        s = step_of(id)
        flunk "the step ended: #{s.inspect}" if %w[completed failed].include?(s["state"])
        s["state"] == "suspended" && s["run"] == i + 1
      end
      client.emit("go-#{i}", i)
    end
    assert_equal (0...50).sum, client.result(id, timeout: WAIT)
    s = step_of(id)
    assert_equal [1, 51], [s["attempt"], s["run"]], "51 runs, all in the first attempt"
  end

  def test_fan_out_plans_come_from_the_core_and_are_bounded
    d = Switchyard::Decision.fan_out("chunk", 5, 2, converge: "total")
    assert_equal 4, d.steps.size
    assert_equal "total", d.final_step
    e = assert_raises(Switchyard::InvalidInput) { Switchyard::Decision.fan_out("chunk", -1, 2) }
    assert_match(/total must not be negative/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { Switchyard::Decision.fan_out("chunk", 10**12, 1) }
    assert_match(/larger batches/, e.message)
  end

  # Client#result waits without the GVL: another Ruby thread keeps running
  # all along (its longest pause is measured, not just its total count).
  def test_a_client_wait_lets_other_threads_run
    id = client.spawn("never.served")
    clock = -> { Process.clock_gettime(Process::CLOCK_MONOTONIC) }
    stop = false
    ticks = []
    counter = Thread.new do
      n = 0
      until stop
        n += 1
        ticks << clock.call if (n % 256).zero?
      end
    end
    sleep 0.05
    t0 = clock.call
    assert_raises(Switchyard::TimeoutError) { client.result(id, timeout: 1) }
    t1 = clock.call
    stop = true
    counter.join
    inside = ticks.select { |t| t >= t0 && t <= t1 }
    assert_operator t1 - t0, :>=, 0.9
    assert_operator inside.size, :>, 10, "the counting thread ran while result waited"
    gap = ([t0] + inside + [t1]).each_cons(2).map { |a, b| b - a }.max
    assert_operator gap, :<, 0.5, "the counting thread stopped for #{gap.round(3)} s while result waited"
  end
end
