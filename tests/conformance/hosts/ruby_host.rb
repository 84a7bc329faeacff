# The Ruby host of the conformance suite (tests/conformance/).
#
#   ruby ruby_host.rb --store sqlite:PATH --scenarios scenarios.json --log PATH
#
# Registers every handler of the scenario file with the options the file
# gives it, prints `ready` once started, and runs until SIGTERM. Handlers
# append `<task_id> <label>` lines to the log where a scenario counts how
# often something ran.
require "json"
require "switchyard"

args = ARGV.each_slice(2).to_h { |k, v| [k.delete_prefix("--"), v] }
spec = JSON.parse(File.read(args.fetch("scenarios")))
LOG = args.fetch("log")
LOG_LOCK = Mutex.new

def note(ctx, label)
  LOG_LOCK.synchronize { File.open(LOG, "a") { |f| f.puts("#{ctx.task_id} #{label}") } }
end

# An exception whose message cannot be rendered.
class Unrenderable < StandardError
  def message = raise(ArgumentError, "no message for you")
  def to_s = raise(ArgumentError, "no string either")
  def inspect = raise(ArgumentError, "no inspect either")
end

# An exception whose every rendering raises, its backtrace included.
class Hostile < StandardError
  def message = raise(ArgumentError, "no message")
  def to_s = raise(ArgumentError, "no string")
  def inspect = raise(ArgumentError, "no inspect")
  def full_message(*) = raise(ArgumentError, "no full message")
  def backtrace = raise(ArgumentError, "no backtrace")
  def backtrace_locations = raise(ArgumentError, "no backtrace locations")
end

# conf_unrepresentable's result: a value with no JSON form.
def unrepresentable(what)
  case what
  when "nan" then Float::NAN
  when "cycle" then {}.tap { |h| h["self"] = h }
  else Object.new
  end
end

BODIES = {
  "conf_value" => ->(input, _ctx) { { "echo" => input } },
  "conf_permanent" => ->(_input, _ctx) { raise Switchyard::PermanentError, "nope" },
  "conf_flaky" => lambda do |_input, ctx|
    raise Switchyard::RetryableError, "flaky on attempt #{ctx.attempt}" if ctx.attempt < 3

    { "attempt" => ctx.attempt }
  end,
  "conf_crash" => ->(_input, _ctx) { raise "boom" },
  "conf_checkpoint_once" => lambda do |_input, ctx|
    charged = ctx.checkpoint("charge") do
      note(ctx, "charge")
      42
    end
    raise Switchyard::RetryableError, "failed after the charge" if ctx.attempt == 1

    { "charged" => charged }
  end,
  "conf_same_name" => lambda do |_input, ctx|
    a = ctx.checkpoint("x") { note(ctx, "first"); 1 }
    b = ctx.checkpoint("x") { note(ctx, "second"); 2 }
    [a, b]
  end,
  "conf_await" => ->(input, ctx) { { "got" => ctx.await_event(input["event"], timeout: 60) } },
  "conf_await_timeout" => lambda do |_input, ctx|
    ctx.await_event("never.sent", timeout: 0.2)
    "unreachable"
  end,
  "conf_suspensions" => lambda do |input, ctx|
    input["n"].times { ctx.sleep(0.02) }
    { "slept" => input["n"] }
  end,
  "conf_timeout" => lambda do |_input, _ctx|
    Kernel.sleep(5)
    "too late"
  end,
  "conf_unrenderable" => ->(_input, _ctx) { raise Unrenderable },
  "conf_hostile" => ->(_input, _ctx) { raise Hostile },
  # Holds its slot until the driver's release file exists, or until
  # cancelled (shutdown), for at most 15 s.
  "conf_hold" => lambda do |_input, ctx|
    note(ctx, "start")
    750.times do
      return { "released" => true } if File.exist?("#{LOG}.release")
      if ctx.cancelled?
        note(ctx, "stopped")
        return "stopped"
      end
      Kernel.sleep(0.02)
    end
    "never released"
  end,
  "conf_unrepresentable" => ->(input, _ctx) { unrepresentable(input["what"]) },
  # Holds its handler's only slot for input["ms"] milliseconds.
  "conf_queued_timeout" => QUEUED = lambda do |input, ctx|
    note(ctx, "started")
    Kernel.sleep(input["ms"] / 1000.0)
    note(ctx, "finished")
    { "slept" => input["ms"] }
  end,
  "conf_queued_cancel" => QUEUED,
  "conf_invalid" => ->(_input, _ctx) { raise Switchyard::InvalidInput, "missing field `amount`" },
  "conf_delegate_fails" => ->(_input, ctx) { { "child" => ctx.delegate("conf_permanent", {}) } },
  "conf_delegate_parallel_fails" => lambda do |_input, ctx|
    out = ctx.delegate_parallel([["conf_value", { "i" => 1 }], ["conf_permanent", {}]])
    {
      "states" => out.map { |o| o["state"] },
      "first" => out[0]["result"],
      "second_error" => (out[1]["error"] || {})["message"]
    }
  end,
  "conf_cancel_running" => lambda do |_input, ctx|
    # A cancelled task raises Switchyard::Cancelled into this thread (push
    # cancellation); cancelled? is checked too, for completeness.
    note(ctx, "started")
    begin
      500.times do
        if ctx.cancelled?
          note(ctx, "saw cancel")
          raise Switchyard::Cancelled, "cancelled"
        end
        Kernel.sleep(0.02)
      end
    rescue Switchyard::Cancelled
      note(ctx, "saw cancel")
      raise
    end
    "never cancelled"
  end,
  "conf_cancel_suspended" => lambda do |_input, ctx|
    note(ctx, "started")
    ctx.await_event("never.comes", timeout: 60)
    "unreachable"
  end,
  "conf_wrong_return" => ->(_input, _ctx) { 42 },
  "conf_batch" => lambda do |items|
    items.map do |item|
      n = item.input["n"]
      n.negative? ? Switchyard::PermanentError.new("negative: #{n}") : { "double" => n * 2 }
    end
  end,
  "conf_batch_fails" => ->(_items) { raise Switchyard::PermanentError, "the whole batch failed" },
  # Two parts, then their sum, which depends on both.
  "conf_plan" => lambda do |_input, _ctx|
    Switchyard::Decision.create(
      [
        Switchyard.step("a", handler: "conf_plan_part", input: { "n" => 2 }),
        Switchyard.step("b", handler: "conf_plan_part", input: { "n" => 3 }),
        Switchyard.step("sum", handler: "conf_plan_sum", input: {}, depends_on: %w[a b])
      ],
      final_step: "sum"
    )
  end,
  # One check, routed on its status.
  "conf_route" => lambda do |input, _ctx|
    Switchyard::Decision.create(
      [
        Switchyard.step("check", handler: "conf_route_check", input: input,
                                 routes: {
                                   ok: [Switchyard.step("shipped", handler: "conf_route_next", input: { "route" => "ok" })],
                                   out_of_stock: [Switchyard.step("backordered", handler: "conf_route_next",
                                                                                 input: { "route" => "out_of_stock" })]
                                 })
      ]
    )
  end,
  "conf_route_check" => lambda do |input, ctx|
    ctx.set_status(input["status"]) if input.key?("status")
    { "qty" => input["qty"] }
  end,
  "conf_route_next" => ->(input, ctx) { { "input" => input, "saw" => ctx.dependency_results } },
  "conf_plan_part" => ->(input, _ctx) { input["n"] * 10 },
  "conf_plan_sum" => lambda do |_input, ctx|
    deps = ctx.dependency_results
    { "sum" => deps.values.sum, "from" => deps.keys.sort }
  end,
  "conf_api_429" => lambda do |_input, ctx|
    now = -> { Time.now.to_f * 1000 }
    t0 = ctx.checkpoint("t0") { now.call }
    raise Switchyard::HttpError.new(429, "slow down", retry_after: 1.0) if ctx.attempt == 1

    { "attempt" => ctx.attempt, "waited" => now.call - t0 >= 900 }
  end
}.freeze

worker = Switchyard::Worker.new(store: args.fetch("store"), concurrency: 16, shutdown_grace: 1.0)
spec.fetch("handlers").each do |name, o|
  opts = {}
  opts[:timeout] = o["timeout"] if o.key?("timeout")
  opts[:concurrency] = o["concurrency"] if o.key?("concurrency")
  if o.key?("max_attempts")
    opts[:retry] = Switchyard::Retry.new(max_attempts: o["max_attempts"],
                                         initial_backoff: o["initial_backoff"] || 1.0,
                                         max_backoff: o["max_backoff"] || 300.0)
  end
  body = BODIES.fetch(name)
  kind = o.fetch("kind", "step") # step, decision, api, batch
  if kind == "batch"
    opts[:max_batch] = o["max_batch"] if o.key?("max_batch")
    opts[:linger] = o["linger"] if o.key?("linger")
    worker.batch(name, **opts) { |items| body.call(items) }
  else
    worker.public_send(kind, name, **opts) { |input, ctx| body.call(input, ctx) }
  end
end
worker.start
$stdout.puts "ready"
$stdout.flush
worker.run
