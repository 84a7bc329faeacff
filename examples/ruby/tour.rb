# frozen_string_literal: true

# A complete worker with one example of each capability (the gem's README shows this file).
#
#   ruby examples/ruby/tour.rb [--store sqlite:tour.db]
require "json"
require "optparse"
require "tmpdir"
require "switchyard"

STOCK = { "bolt" => 10 }.freeze

def build(worker)
  # A decision plans steps; `check` is routed on the status it ends with.
  worker.decision("order.place") do |order, _ctx|
    Switchyard::Decision.create(
      [Switchyard.step("check", handler: "stock.check", input: order, routes: {
                         ok: [Switchyard.step("price", handler: "order.price"),
                              Switchyard.step("ship", handler: "order.ship", depends_on: %w[check price])],
                         out_of_stock: [Switchyard.step("backorder", handler: "order.backorder")]
                       })]
    )
  end

  worker.step("stock.check", retry: { max_attempts: 3, initial_backoff: 0.05, max_backoff: 0.05 }) do |order, ctx|
    have = ctx.checkpoint("stock") { STOCK.fetch(order["sku"], 0) } # once per task, ever
    ctx.set_status(:out_of_stock) if have < order["qty"]
    order.merge("have" => have)
  end

  # An API-shaped handler: a 429 is retried after Retry-After, other 4xx fail.
  worker.api("order.price", rate_limit: 50) do |_input, ctx|
    raise Switchyard::HttpError.new(429, "slow down", retry_after: 0.1) if ctx.attempt == 1

    { unit: 2.5 }
  end

  # Dependencies' results; a child task delegated (the step suspends meanwhile).
  worker.step("order.ship") do |_input, ctx|
    deps = ctx.dependency_results
    label = ctx.delegate("label.print", { sku: deps["check"]["sku"] })
    { total: deps["check"]["qty"] * deps["price"]["unit"], label: label }
  end

  worker.step("order.backorder") do |_input, ctx|
    check = ctx.dependency_results["check"]
    # A child with a response event, awaited durably (the slot is freed meanwhile).
    ctx.spawn("supplier.ask", check, response_event: "supplied:#{ctx.task_id}")
    supplied = ctx.await_event("supplied:#{ctx.task_id}", timeout: 60)
    { backordered: check["qty"] - check["have"], supplier: supplied["result"] }
  end

  worker.step("supplier.ask") do |_item, ctx|
    ctx.sleep(0.05) # durable: survives restarts
    "on its way"
  end

  # A batch handler gets many steps at once and answers each.
  worker.batch("label.print", max_batch: 16, linger: 0.01) do |items|
    items.map { |item| "LABEL-#{item.input['sku']}" }
  end

  # Several children at once; each one's outcome is reported.
  worker.step("audit") do |skus, ctx|
    outcomes = ctx.delegate_parallel(skus.map { |sku| ["label.print", { sku: sku }] })
    ctx.emit_event("audited", outcomes.size)
    outcomes.map { |o| o["result"] }
  end

  # Long work: heartbeat, and stop when cancelled.
  worker.step("inventory.scan", timeout: 60) do |_input, ctx|
    10_000.times do |n|
      raise Switchyard::Cancelled, "stopped at bin #{n}" if ctx.cancelled?

      ctx.heartbeat # keeps the lease while the work goes on
      sleep 0.01
    end
    "done"
  end
end

store = nil
OptionParser.new { |o| o.on("--store URL") { |v| store = v } }.parse!
tmp = Dir.mktmpdir("switchyard-tour-")
store ||= "sqlite:#{File.join(tmp, 'tour.db')}"
$stdout.sync = true
worker = Switchyard::Worker.new(store: store, concurrency: 16)
build(worker)
client = Switchyard::Client.new(store: store)
worker.start
begin
  shipped = client.spawn("order.place", { sku: "bolt", qty: 4 })
  backordered = client.spawn("order.place", { sku: "nut", qty: 3 })
  puts "shipped: #{client.result(shipped, timeout: 30).to_json}"
  puts "backordered: #{client.result(backordered, timeout: 30).to_json}"
  puts "audit: #{client.result(client.spawn('audit', %w[a b]), timeout: 30).to_json}"
  scan = client.spawn("inventory.scan")
  sleep 0.3
  client.cancel(scan)
  puts "scan: #{client.wait(scan, timeout: 30)['state']}"
ensure
  worker.stop
  FileUtils.rm_rf(tmp)
end
