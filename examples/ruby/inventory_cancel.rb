# frozen_string_literal: true

# An inventory checker with cancellation, in Ruby.
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

require "optparse"
require "tmpdir"
require "timeout"
require "switchyard"

BINS = 10_000
SCANNING = Queue.new
STOPPED = Queue.new

def build(worker)
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
