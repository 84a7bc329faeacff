# frozen_string_literal: true

# The Ruby half of `make demo`: a worker process serving `invoice.issue` for
# the Rust order-fulfilment workflow, on the same SQLite file.
#
#   ruby examples/ruby/demo_worker.rb --store sqlite:PATH
#
# Stops gracefully on SIGINT/SIGTERM (the demo sends SIGTERM when the order
# is done).

require "optparse"
require "switchyard"

store = nil
OptionParser.new do |o|
  o.banner = "usage: demo_worker.rb --store URL"
  o.on("--store URL", "store URL shared with the Rust host") { |v| store = v }
end.parse!
abort "demo_worker.rb: --store URL is required" unless store
$stdout.sync = true

worker = Switchyard::Worker.new(store: store, concurrency: 4)

worker.step("invoice.issue", timeout: 30) do |input, ctx|
  # Checkpointed: a retry or replay never issues the invoice twice.
  ctx.checkpoint("invoice") do
    order, amount, currency = input.values_at("order", "amount", "currency")
    puts "[ruby pid #{Process.pid}] invoice.issue  issued INV-#{order} for #{amount} #{currency}"
    { invoice: "INV-#{order}", amount: amount, issued_by: "ruby" }
  end
end

worker.run
