# frozen_string_literal: true

# An inventory checker: routing on a status, a transient error retried,
# and cancellation, in Ruby.
#
# `inventory.order` plans one `check` step routed on its status: the
# `inventory.check` handler calls `ctx.set_status("out_of_stock")` when the
# stock is short (and sets nothing, status `ok`, when it is not); `ok` ships
# and `out_of_stock` backorders, each reading the check's result. The
# check's first attempt fails with a transient error (the warehouse API
# timed out), which is retried.
#
# `inventory.scan` walks a long list of warehouse bins, checkpointing its
# cursor and heartbeating so its lease stays valid; it checks
# `ctx.cancelled?` between bins, and a cancellation that arrives in the
# middle of a bin interrupts the thread (`Switchyard::Interrupted`), so
# cancelling the task stops it promptly either way. `inventory.watch`
# starts a scan as a child task and then awaits a restock event that never
# comes (its step is suspended, holding no slot); cancelling it with
# `cascade: true` cancels the suspended step and the child scan.
#
#   ruby examples/ruby/inventory_cancel.rb [--store sqlite:inv.db]

require "json"
require "optparse"
require "tmpdir"
require "timeout"
require "switchyard"

BINS = 10_000
STOCK = { "bolt" => 10, "nut" => 1 }.freeze
SCANNING = Queue.new
STOPPED = Queue.new

def build(worker)
  worker.decision("inventory.order") do |input, _ctx|
    Switchyard::Decision.create(
      [
        Switchyard.step("check", handler: "inventory.check", input: input,
                                 routes: {
                                   ok: [Switchyard.step("ship", handler: "inventory.ship")],
                                   out_of_stock: [Switchyard.step("backorder", handler: "inventory.backorder")]
                                 })
      ]
    )
  end

  worker.step("inventory.check", retry: { max_attempts: 3, initial_backoff: 0.05, max_backoff: 0.05 }) do |input, ctx|
    raise Switchyard::RetryableError, "warehouse API timed out" if ctx.attempt == 1

    have = STOCK.fetch(input["sku"], 0)
    if have < input["qty"]
      ctx.set_status("out_of_stock")
      { sku: input["sku"], missing: input["qty"] - have }
    else
      { sku: input["sku"], reserved: input["qty"] }
    end
  end

  worker.step("inventory.ship") do |_input, ctx|
    check = ctx.dependency_results["check"]
    { shipped: check["reserved"], sku: check["sku"] }
  end

  worker.step("inventory.backorder") do |_input, ctx|
    check = ctx.dependency_results["check"]
    { backordered: check["missing"], sku: check["sku"] }
  end

  worker.step("inventory.scan", timeout: 120) do |input, ctx|
    cursor = ctx.checkpoint("start") { 0 }
    bin = cursor
    begin
      while bin < BINS
        # Cooperative: check between bins.
        raise Switchyard::Cancelled, "scan cancelled" if ctx.cancelled?

        SCANNING << input["warehouse"] if bin == cursor
        sleep 0.005 # count the bin
        begin
          ctx.heartbeat if (bin % 50).zero?
        rescue Switchyard::LeaseLost
          # Taken over by another host (a cancellation raises
          # Switchyard::Cancelled instead): ctx.cancelled? is true from now on.
        end
        bin += 1
      end
    rescue Switchyard::Cancelled => e
      # Either the check above, or push cancellation: the core interrupts
      # the thread (Switchyard::Interrupted) even in the middle of a bin.
      how = e.is_a?(Switchyard::Interrupted) ? "interrupted" : "noticed between bins"
      puts "inventory.scan(#{input['warehouse']}): cancelled at bin #{bin} (#{how}), stopping"
      STOPPED << [input["warehouse"], bin]
      raise
    end
    { bins: BINS }
  end

  worker.step("inventory.watch") do |input, ctx|
    ctx.spawn("inventory.scan", { warehouse: input["warehouse"] })
    ctx.await_event("restock:#{input['warehouse']}", timeout: 3600)
  end
end

def wait_until(what, timeout = 20)
  deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
  until yield
    raise "#{what}: not within #{timeout} s" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

    sleep 0.02
  end
end

store = nil
OptionParser.new { |o| o.on("--store URL", "store URL (default: a fresh temporary SQLite file)") { |v| store = v } }.parse!
tmp = nil
unless store
  tmp = Dir.mktmpdir("switchyard-inventory-")
  store = "sqlite:#{File.join(tmp, 'inventory.db')}"
end
$stdout.sync = true
worker = Switchyard::Worker.new(store: store, concurrency: 4)
build(worker)
client = Switchyard::Client.new(store: store)
worker.start
begin
  [["bolt", 4, { "shipped" => 4, "sku" => "bolt" }], ["nut", 3, { "backordered" => 2, "sku" => "nut" }]].each do |sku, qty, want|
    order = client.spawn("inventory.order", { sku: sku, qty: qty })
    result = client.result(order, timeout: 20)
    check = client.inspect(order)["steps"].find { |s| s["name"] == "check" }
    puts "order #{sku} x#{qty}: check ended `#{check['status']}` on attempt #{check['attempt']}: #{result.to_json}"
    raise "order #{sku}: #{result.inspect}" unless result == want
    raise "the transient error was retried once" unless check["attempt"] == 2
  end
  scan = client.spawn("inventory.scan", { warehouse: "W1" })
  Timeout.timeout(20) { SCANNING.pop }
  puts "client: cancelling scan #{scan}"
  raise "cancel refused" unless client.cancel(scan)
  state = client.wait(scan, timeout: 20)["state"]
  raise "scan is #{state}" unless state == "cancelled"

  warehouse, bin = Timeout.timeout(20) { STOPPED.pop }
  raise "wrong scan stopped" unless warehouse == "W1"

  watch = client.spawn("inventory.watch", { warehouse: "W2" })
  wait_until("the watch suspended with its child scan running") do
    d = client.inspect(watch)
    d["steps"][0]["state"] == "suspended" && !d["children"].empty?
  end
  Timeout.timeout(20) { SCANNING.pop }
  puts "client: cancelling watch #{watch} and its descendants"
  raise "cancel refused" unless client.cancel(watch, cascade: true)
  raise "watch not cancelled" unless client.wait(watch, timeout: 20)["state"] == "cancelled"

  client.inspect(watch)["children"].each do |c|
    raise "child #{c['id']} not cancelled" unless client.wait(c["id"], timeout: 20)["state"] == "cancelled"
  end
  child_warehouse, = Timeout.timeout(20) { STOPPED.pop }
  raise "the child scan did not notice" unless child_warehouse == "W2"

  puts "done: scan stopped at bin #{bin} of #{BINS}; watch and its scan cancelled"
ensure
  worker.stop
  FileUtils.rm_rf(tmp) if tmp
end
