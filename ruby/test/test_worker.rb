# frozen_string_literal: true

require_relative "helper"

class TestWorker < Minitest::Test
  include SwitchyardTest

  def test_step_gets_string_keys_and_returns_json
    w = make_worker
    seen = Queue.new
    w.step("greet") do |input, ctx|
      seen << [input, ctx.class, ctx.handler, ctx.step_name, ctx.attempt]
      { hello: input["name"], tags: [:a, 1, 2.5, nil, true] }
    end
    w.start
    id = client.spawn("greet", { name: "Ada", nested: { deep: [1] } })
    assert_equal({ "hello" => "Ada", "tags" => ["a", 1, 2.5, nil, true] }, client.result(id, timeout: WAIT))
    input, klass, handler, step, attempt = pop(seen)
    assert_equal({ "name" => "Ada", "nested" => { "deep" => [1] } }, input)
    assert_equal Switchyard::Context, klass
    assert_equal "greet", handler
    assert_equal "greet", step
    assert_equal 1, attempt
  end

  def test_non_serialisable_result_fails_the_step_naming_the_class
    w = make_worker
    w.step("bad") { |_i, _c| { "when" => Object.new } }
    w.start
    id = client.spawn("bad")
    t = client.wait(id, timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_match(/Object is not JSON-serialisable/, t["error"]["message"])
    assert_match(/the Ruby handler `bad` returned/, t["error"]["message"])
  end

  def test_permanent_error_fails_at_once_with_backtrace
    w = make_worker
    w.step("perm", retry: 5) { |_i, _c| raise Switchyard::PermanentError, "card declined" }
    w.start
    id = client.spawn("perm")
    t = client.wait(id, timeout: WAIT)
    assert_equal "failed", t["state"]
    err = step_of(id)["error"]
    assert_equal "permanent", err["kind"]
    assert_equal "card declined", err["message"]
    assert_equal 1, err["attempt"]
    assert_match(/Switchyard::PermanentError: card declined/, err["trace"])
    assert_match(/test_worker\.rb:\d+/, err["trace"])
    e = assert_raises(Switchyard::TaskFailed) { client.result(id, timeout: WAIT) }
    assert_match(/card declined/, e.message)
  end

  def test_other_exceptions_are_retried_with_the_ruby_backtrace
    w = make_worker
    attempts = Queue.new
    w.step("flaky", retry: Switchyard::Retry.new(max_attempts: 3, initial_backoff: 0.01, max_backoff: 0.05)) do |_i, ctx|
      attempts << ctx.attempt
      raise KeyError, "missing sku" if ctx.attempt < 3

      "ok on #{ctx.attempt}"
    end
    w.start
    id = client.spawn("flaky")
    assert_equal "ok on 3", client.result(id, timeout: WAIT)
    assert_equal [1, 2, 3], Array.new(3) { pop(attempts) }
    errors = client.inspect(id)["steps"][0]
    # The last failed attempt's error stays visible with its Ruby backtrace.
    detail = JSON.generate(client.inspect(id))
    assert_match(/KeyError: missing sku/, detail)
    assert_match(/test_worker\.rb/, detail)
    refute_nil errors
  end

  def test_attempts_exhausted_fail_the_task
    w = make_worker
    w.step("always", retry: { max_attempts: 2, initial_backoff: 0.01 }) { |_i, _c| raise ArgumentError, "nope" }
    w.start
    id = client.spawn("always")
    t = client.wait(id, timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_match(/ArgumentError: nope/, t["error"]["message"])
  end

  def test_retryable_error_with_retry_after
    w = make_worker
    w.step("later", retry: 3) do |_i, ctx|
      raise Switchyard::RetryableError.new("busy", retry_after: 0.05) if ctx.attempt == 1

      ctx.attempt
    end
    w.start
    id = client.spawn("later")
    assert_equal 2, client.result(id, timeout: WAIT)
  end

  def test_invalid_input_fails_at_once
    w = make_worker
    w.step("strict", retry: 5) { |input, _c| raise Switchyard::InvalidInput, "amount must be positive" if input["amount"] <= 0 }
    w.start
    id = client.spawn("strict", { amount: -1 })
    t = client.wait(id, timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_equal "invalid_input", step_of(id)["error"]["kind"]
    assert_match(/amount must be positive/, t["error"]["message"])
  end

  def test_a_raising_block_fails_only_its_step
    w = make_worker
    w.step("div") { |input, _c| 10 / input["by"] }
    w.start
    bad = client.spawn("div", { by: 0 })
    good = client.spawn("div", { by: 5 })
    assert_equal 2, client.result(good, timeout: WAIT)
    wait_for("the failing step recorded ZeroDivisionError") do
      JSON.generate(client.inspect(bad)).include?("ZeroDivisionError")
    end
    assert w.running?
  end

  def test_batch_handler_answers_each_item
    w = make_worker
    sizes = Queue.new
    w.batch("square", max_batch: 16, linger: 0.05, retry: 1) do |items|
      sizes << items.size
      items.map do |it|
        assert_kind_of Switchyard::Context, it.ctx
        it.input["n"] == 3 ? Switchyard::PermanentError.new("three is unlucky") : it.input["n"] * it.input["n"]
      end
    end
    w.start
    ids = client.spawn_many((1..6).map { |n| { handler: "square", input: { n: n } } })
    results = ids.map { |id| client.wait(id, timeout: WAIT) }
    assert_equal [1, 4, nil, 16, 25, 36], results.map { |t| t["result"] }
    assert_equal "failed", results[2]["state"]
    assert_match(/three is unlucky/, results[2]["error"]["message"])
    assert_equal 6, Array.new(sizes.size) { sizes.pop }.sum
  end

  def test_batch_returning_the_wrong_count_fails_the_batch
    w = make_worker
    w.batch("short", max_batch: 4, retry: 1) { |_items| [] }
    w.start
    id = client.spawn("short", 1)
    t = client.wait(id, timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_match(/returned 0 results for 1 steps/, t["error"]["message"])
  end

  def test_decision_creates_steps_and_convergence_sees_results
    w = make_worker
    w.decision("plan") do |input, _ctx|
      Switchyard::Decision.create([
        Switchyard.step("a", handler: "add", input: { x: input["x"], y: 1 }),
        Switchyard.step("b", handler: "add", input: { x: input["x"], y: 2 }),
        Switchyard.step("sum", depends_on: %w[a b])
      ])
    end
    w.step("add") { |i, _c| i["x"] + i["y"] }
    w.step("sum") { |_i, ctx| ctx.dependency_results.values.sum }
    w.decision("nothing") { |_i, _c| Switchyard::Decision.complete({ done: true }) }
    w.decision("wrong") { |_i, _c| 42 }
    w.start
    assert_equal 23, client.result(client.spawn("plan", { x: 10 }), timeout: WAIT)
    assert_equal({ "done" => true }, client.result(client.spawn("nothing"), timeout: WAIT))
    t = client.wait(client.spawn("wrong"), timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_match(/returned Integer, not Switchyard::Decision/, t["error"]["message"])
  end

  def test_fan_out_covers_every_range_once
    w = make_worker
    w.decision("count") { |i, _c| Switchyard::Decision.fan_out("chunk", i["total"], 4, input: { k: 1 }, converge: "total") }
    w.step("chunk") { |i, _c| (i["start"]...i["end"]).sum }
    w.step("total") { |_i, ctx| ctx.dependency_results.values.sum }
    w.start
    assert_equal (0...10).sum, client.result(client.spawn("count", { total: 10 }), timeout: WAIT)
  end

  def test_api_handler_classifies_http_failures
    w = make_worker
    calls = Queue.new
    w.api("remote", retry: { max_attempts: 3, initial_backoff: 0.01 }, rate_limit: 1000, burst: 10) do |input, ctx|
      calls << ctx.attempt
      case input["mode"]
      when "404" then raise Switchyard::HttpError.new(404, "no such customer")
      when "429" then ctx.attempt == 1 ? raise(Switchyard::HttpError.new(429, "slow down", retry_after: 0.01)) : "ok after 429"
      when "net" then ctx.attempt == 1 ? raise(Switchyard::NetworkError, "connection reset") : "ok after reset"
      else { status: 200 }
      end
    end
    w.start
    t = client.wait(client.spawn("remote", { mode: "404" }), timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_match(/HTTP 404: no such customer/, t["error"]["message"])
    assert_equal "ok after 429", client.result(client.spawn("remote", { mode: "429" }), timeout: WAIT)
    assert_equal "ok after reset", client.result(client.spawn("remote", { mode: "net" }), timeout: WAIT)
    assert_equal({ "status" => 200 }, client.result(client.spawn("remote", { mode: "ok" }), timeout: WAIT))
  end

  def test_bad_registrations_are_rejected_clearly
    w = make_worker
    e = assert_raises(ArgumentError) { w.step("x", colour: "red") { nil } }
    assert_match(/unknown option :colour/, e.message)
    e = assert_raises(ArgumentError) { w.step("x") }
    assert_match(/needs a block/, e.message)
    e = assert_raises(ArgumentError) { w.batch("x", max_batch: 2, retry: "often") { [] } }
    assert_match(/retry must be/, e.message)
    e = assert_raises(Switchyard::InvalidInput) { w.step("") { nil } }
    assert_match(/handler name must not be empty/, e.message)
    e = assert_raises(ArgumentError) { w.step("neg", timeout: -1) { nil } }
    assert_match(/timeout must be a non-negative number/, e.message)
    w.step("once") { nil }
    e = assert_raises(Switchyard::ConfigError) { w.step("once") { nil } }
    assert_match(/registered twice/, e.message)
    assert_raises(Switchyard::ConfigError) { make_worker.start }
    e = assert_raises(ArgumentError) { Switchyard::Worker.new(store: @store, concurrency: 0) }
    assert_match(/concurrency must be at least 1/, e.message)
    e = assert_raises(Switchyard::ConfigError) { Switchyard::Worker.new(store: "mongodb://x").tap { |x| x.step("a") { nil } }.start }
    assert_match(/mongodb/, e.message)
  end

  def test_several_workers_created_and_stopped_in_one_process
    5.times do |n|
      w = make_worker
      w.step("round") { |i, _c| i["n"] * 2 }
      w.start
      assert_equal n * 2, client.result(client.spawn("round", { n: n }), timeout: WAIT)
      w.stop
      refute w.running?
    end
    # Two at once on one store, then both stopped.
    a = make_worker
    b = make_worker
    a.step("from.a") { "a" }
    b.step("from.b") { "b" }
    a.start
    b.start
    assert_equal %w[a b], [client.result(client.spawn("from.a"), timeout: WAIT), client.result(client.spawn("from.b"), timeout: WAIT)]
    a.stop
    b.stop
    assert_empty client.workers
  end

  def test_rust_panic_becomes_a_ruby_exception
    old = ENV["RUST_BACKTRACE"]
    ENV["RUST_BACKTRACE"] = "0" # keep the expected panic's report short
    e = assert_raises(Switchyard::Error) { Switchyard::Native.panic_for_test("boom in rust") }
    assert_match(/Rust panic: boom in rust/, e.message)
    # The process carries on.
    assert_equal [], client.list
  ensure
    ENV["RUST_BACKTRACE"] = old
  end

  def test_run_returns_when_another_thread_stops_the_worker
    w = make_worker
    w.step("x") { |i, _c| i }
    before = Signal.trap("TERM", "DEFAULT")
    Signal.trap("TERM", before)
    runner = Thread.new { w.run }
    Thread.pass until w.running? || !runner.alive?
    assert_equal 5, client.result(client.spawn("x", 5), timeout: WAIT)
    w.stop
    assert_same runner, runner.join(WAIT), "run returned after stop"
    refute w.running?
    # run restored the signal handlers it replaced.
    assert_equal before, Signal.trap("TERM", before)
  end

  def test_a_killed_handler_thread_hands_its_step_back
    w = make_worker(threads: 2)
    w.step("fragile", retry: { max_attempts: 3, initial_backoff: 0.01 }) do |_i, ctx|
      Thread.current.kill if ctx.attempt == 1
      "survived on attempt #{ctx.attempt}"
    end
    w.start
    id = client.spawn("fragile")
    assert_equal "survived on attempt 2", client.result(id, timeout: WAIT)
    assert_match(/was interrupted before answering/, JSON.generate(client.inspect(id)))
  end

  # One serving thread takes jobs in batches. A "hold" step keeps it busy
  # while four "slow" steps are dispatched, so it then takes them in one
  # batch; the first slow body holds the thread past the others' 0.8 s
  # timeout, so the three left in its batch were given up on before their
  # turn and must never start their bodies.
  def test_jobs_the_core_gave_up_on_never_start
    w = make_worker(concurrency: 5, threads: 1, batch: 4)
    started = Queue.new
    holding = Queue.new
    w.step("hold") do |_input, _ctx|
      holding << true
      Kernel.sleep(0.5)
      "held"
    end
    w.step("slow", timeout: 0.8, retry: 1) do |input, _ctx|
      started << input["i"]
      t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      begin
        Kernel.sleep(0.05) while Process.clock_gettime(Process::CLOCK_MONOTONIC) - t < 1.5
      rescue Switchyard::Cancelled
        retry # hold the thread, cancelled or not
      end
      "done"
    end
    w.start
    hold = client.spawn("hold")
    pop(holding)
    ids = (0...4).map { |i| client.spawn("slow", { i: i }) }
    assert_equal "held", client.result(hold, timeout: WAIT)
    ids.each do |id|
      t = client.wait(id, timeout: WAIT)
      assert_equal "failed", t["state"]
      assert_match(/timed out after 800 ms/, t["error"]["message"])
    end
    Kernel.sleep(2.0) # long enough for a wrongly started body to show up
    bodies = []
    bodies << started.pop until started.empty?
    assert_equal 1, bodies.size, "bodies started: #{bodies.inspect}"
  end

  def test_stop_is_idempotent_and_start_twice_is_refused
    w = make_worker
    w.step("x") { 1 }
    w.start
    assert_raises(Switchyard::ConfigError) { w.start }
    refute_nil w.host_id
    w.stop
    w.stop
    refute w.running?
  end

  # An exception whose #message, #to_s and #inspect all raise.
  class BadError < StandardError
    def message = raise("no message for you")
    def to_s = raise("no to_s either")
    def inspect = raise("nor inspect")
  end

  # One handler thread only: had the bad exception killed it, nothing
  # would run the steps after it.
  def test_an_exception_whose_message_raises_fails_only_its_step
    w = make_worker(threads: 1)
    w.step("bad", retry: 1) { |_i, _c| raise BadError }
    w.step("good") { |i, _c| i }
    w.start
    bad = client.spawn("bad")
    t = client.wait(bad, timeout: WAIT)
    assert_equal "failed", t["state"]
    assert_match(/#<TestWorker::BadError: message raised RuntimeError>/, t["error"]["message"])
    assert_equal 7, client.result(client.spawn("good", 7), timeout: WAIT)
    assert w.running?
  end

  def handed_back?(id)
    s = step_of(id)
    s["state"] == "ready" && s["attempt"].zero? && s["error"].nil?
  end

  # Interrupt in a handler stops the worker as #stop does and hands the
  # step back: it costs no attempt and the next host runs it as attempt 1.
  def test_interrupt_in_a_handler_stops_the_worker_and_hands_the_step_back
    w = make_worker(threads: 2)
    w.step("halt", retry: 1) { |_i, _c| raise Interrupt }
    w.start
    id = client.spawn("halt")
    e = nil
    _out, err = capture_io do
      wait_for("the worker stopped itself") { !w.running? }
      w.stop # waits for the stop under way
      e = w.stop_cause
    end
    assert_kind_of Interrupt, e
    assert_match(/raised Interrupt.*stopping the worker/, err)
    assert_empty client.workers, "the host deregistered"
    wait_for("the step was handed back without an attempt") { handed_back?(id) }

    w2 = make_worker
    w2.step("halt") { |_i, ctx| "attempt #{ctx.attempt}" }
    w2.start
    assert_equal "attempt 1", client.result(id, timeout: WAIT)
  end

  # The same for SystemExit (`exit` in a handler), under #run: run
  # re-raises it once the worker has stopped, so the program exits with
  # the handler's status.
  def test_exit_in_a_handler_stops_run_gracefully_and_reraises
    w = make_worker(threads: 2)
    w.step("quit", retry: 1) { |_i, _c| exit 3 }
    before = Signal.trap("TERM", "DEFAULT")
    Signal.trap("TERM", before)
    runner = Thread.new { w.run }
    runner.report_on_exception = false
    Thread.pass until w.running? || !runner.alive?
    id = client.spawn("quit")
    e = nil
    capture_io { e = assert_raises(SystemExit) { Timeout.timeout(WAIT) { runner.join } } }
    assert_equal 3, e.status
    refute w.running?
    wait_for("the step was handed back without an attempt") { handed_back?(id) }
  end

  # A handler thread that dies anyway is replaced, and the step it held is
  # retried at once. One thread: without a replacement nothing would run.
  def test_a_dead_handler_thread_is_replaced_and_its_step_retried
    w = make_worker(threads: 1)
    w.step("fragile", retry: { max_attempts: 3, initial_backoff: 0.01 }) do |_i, ctx|
      Thread.current.kill if ctx.attempt == 1
      "survived on attempt #{ctx.attempt}"
    end
    w.step("canary") { |i, _c| i }
    w.start
    _out, err = capture_io do
      id = client.spawn("fragile")
      assert_equal "survived on attempt 2", client.result(id, timeout: WAIT)
      assert_equal 1, client.result(client.spawn("canary", 1), timeout: WAIT)

      # An exception raised into an idle thread (it waits inside Rust).
      threads = w.instance_variable_get(:@threads)
      victim = threads.first
      victim.raise(RuntimeError, "raised from outside")
      wait_for("the thread died") { !victim.alive? }
      assert_equal 2, client.result(client.spawn("canary", 2), timeout: WAIT)
    end
    assert_match(/switchyard-0 was killed; starting a new one/, err)
    assert_match(/switchyard-0 died with RuntimeError: raised from outside; starting a new one/, err)
    assert_equal 2, w.instance_variable_get(:@threads).count(&:alive?), "one handler thread and the cancel watcher"
  end

  # #stop joins every thread even if one died with an exception, and
  # reports the death instead of raising it.
  def test_stop_joins_every_thread_when_one_died_with_an_exception
    w = make_worker(threads: 3)
    w.step("x") { |i, _c| i }
    w.start
    assert_equal 1, client.result(client.spawn("x", 1), timeout: WAIT)
    dead = Thread.new { raise ArgumentError, "died early" }
    dead.report_on_exception = false
    Thread.pass while dead.alive?
    threads = w.instance_variable_get(:@threads)
    threads.unshift(dead)
    _out, err = capture_io { w.stop }
    assert_match(/had died with ArgumentError: died early/, err)
    assert(threads.none?(&:alive?), "every handler thread was joined")
    refute w.running?
  end

  def test_health_listen_serves_health_and_metrics
    require "net/http"
    w = make_worker(health_listen: "127.0.0.1:0")
    w.step("echo") { |input, _ctx| input }
    assert_nil w.health_addr
    w.start
    addr = w.health_addr
    assert_match(/\A127\.0\.0\.1:\d+\z/, addr)
    host, port = addr.split(":")
    id = client.spawn("echo", { m: "PAYLOAD-MARKER-rb" })
    client.result(id, timeout: WAIT)
    assert_equal "ok\n", Net::HTTP.get(host, "/healthz", Integer(port))
    text = ""
    200.times do
      text = Net::HTTP.get(host, "/metrics", Integer(port))
      break if text.include?('switchyard_steps_completed_total{handler="echo"} 1')

      sleep 0.01
    end
    assert_includes text, 'switchyard_steps_completed_total{handler="echo"} 1'
    assert_includes text, 'lang="ruby"'
    refute_includes text, "PAYLOAD-MARKER-rb"
    e = assert_raises(ArgumentError) { Switchyard::Worker.new(store: "memory", health_listen: "localhost:80") }
    assert_match(/health_listen must be an address/, e.message)
  end
end
