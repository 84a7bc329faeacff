# frozen_string_literal: true

# Order fulfilment with events, in Ruby.
#
# A decision step reserves stock (checkpointed), then fans out to payment,
# packing and e-mail in parallel; the convergence step `order.ship` awaits the
# payment provider's confirmation (emitted before it waits: the event is
# cached) and the courier's delivery (emitted after it suspended: the step is
# parked, its slot freed, and the event resumes it).
#
#   ruby examples/ruby/order_events.rb [--store sqlite:orders.db]

require "optparse"
require "tmpdir"
require "switchyard"

T0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)

def say(who, msg)
  ms = (Process.clock_gettime(Process::CLOCK_MONOTONIC) - T0) * 1000
  puts format("[%7.0f ms] %-16s %s", ms, who, msg)
end

def build(worker)
  worker.decision("order.fulfil") do |order, ctx|
    raise Switchyard::InvalidInput, "the order has no items" if order["items"].to_a.empty?

    reservation = ctx.checkpoint("reserve-inventory") { { reservation: "RES-#{order['id']}" } }
    say("order.fulfil", "reserved #{reservation}; deciding the next steps")
    total = order["items"].sum { |i| i["qty"] * i["price"] }
    parallel = [
      Switchyard.step("charge.payment", input: { order: order["id"], amount: total }),
      Switchyard.step("pack.items", input: { order: order["id"], items: order["items"] }),
      Switchyard.step("notify.customer", input: { order: order["id"], email: order["email"] })
    ]
    names = parallel.map { |s| s["name"] }
    Switchyard::Decision.create(parallel + [Switchyard.step("order.ship", input: { order: order["id"] }, depends_on: names)])
  end

  worker.step("charge.payment", retry: 3) do |input, _ctx|
    say("charge.payment", format("authorising %.2f", input["amount"]))
    { authorisation: "AUTH-#{input['order']}", amount: input["amount"] }
  end

  worker.step("pack.items") do |input, _ctx|
    say("pack.items", "packing #{input['items'].size} lines")
    { parcel: "PCL-#{input['order']}" }
  end

  worker.step("notify.customer") do |input, ctx|
    ctx.checkpoint("email") { { sent_to: input["email"] } }
  end

  worker.step("order.ship") do |input, ctx|
    done = ctx.dependency_results
    order_id = input["order"]
    paid = ctx.await_event("payment.confirmed:#{order_id}", timeout: 60)
    say("order.ship", "payment confirmed #{paid}")
    tracking = ctx.checkpoint("ship") { { tracking: "TRK-#{order_id}" } }
    say("order.ship", "waiting for the courier (the step suspends)")
    delivered = ctx.await_event("shipment.delivered:#{order_id}", timeout: 60)
    say("order.ship", "delivered #{delivered}")
    { status: "delivered", order: order_id, **done.transform_keys(&:to_sym), payment: paid, shipment: tracking,
      delivery: delivered }
  end
end

store = nil
OptionParser.new { |o| o.on("--store URL", "store URL (default: a fresh temporary SQLite file)") { |v| store = v } }.parse!
tmp = nil
unless store
  tmp = Dir.mktmpdir("switchyard-orders-")
  store = "sqlite:#{File.join(tmp, 'orders.db')}"
end
$stdout.sync = true
worker = Switchyard::Worker.new(store: store, concurrency: 8)
build(worker)
client = Switchyard::Client.new(store: store)
order = { id: "R-1001", email: "ada@example.com", items: [{ sku: "tea", qty: 2, price: 4.5 }] }
worker.start
begin
  task = client.spawn("order.fulfil", order, idempotency_key: "order:#{order[:id]}")
  say("client", "spawned order.fulfil (task #{task})")
  client.emit("payment.confirmed:#{order[:id]}", { amount: 9.0 })
  say("client", "payment provider emitted payment.confirmed before anyone awaited it")
  # Deliver once the ship step is parked on the delivery event.
  deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 30
  loop do
    ship = client.inspect(task)["steps"].find { |s| s["name"] == "order.ship" }
    break if ship && ship["state"] == "suspended" && ship.dig("wait", "event").to_s.start_with?("shipment.")
    raise "order.ship never suspended on the delivery event" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

    sleep 0.02
  end
  client.emit("shipment.delivered:#{order[:id]}", { signed_by: "Ada" })
  say("client", "courier emitted shipment.delivered")
  result = client.result(task, timeout: 30)
  say("client", "result: #{result}")
  raise "unexpected result #{result}" unless result["status"] == "delivered" && result["delivery"] == { "signed_by" => "Ada" }
  raise "missing payment" unless result["charge.payment"]["authorisation"] == "AUTH-R-1001"
ensure
  worker.stop
  FileUtils.rm_rf(tmp) if tmp
end
