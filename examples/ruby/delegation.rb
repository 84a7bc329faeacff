# frozen_string_literal: true

# Worker delegation with parallel sub-tasks and response events, in Ruby.
#
# `report.build` delegates one `region.total` child per region in parallel
# (the parent step suspends, its slot freed, until every child has finished)
# and gets their results in order, with a failing region reported per child
# instead of failing the report; then it delegates one more child. The report
# task itself is spawned with `response_event`, so a caller anywhere can
# await the event `report.ready` carrying its outcome.
#
#   ruby examples/ruby/delegation.rb [--store sqlite:report.db]

require "optparse"
require "tmpdir"
require "switchyard"

SALES = { "north" => [120, 80], "south" => [200], "east" => [50, 50, 25], "atlantis" => nil }.freeze

def build(worker)
  worker.step("report.build") do |input, ctx|
    outcomes = ctx.delegate_parallel(input["regions"].map { |r| ["region.total", { region: r }] })
    totals = {}
    failures = {}
    input["regions"].zip(outcomes).each do |region, o|
      if o["state"] == "completed"
        totals[region] = o["result"]
      else
        failures[region] = o["error"]["message"]
      end
    end
    # One more child, awaited on its own.
    rate = ctx.delegate("fx.rate", { to: "EUR" })
    puts "report: totals=#{totals} failures=#{failures.keys} rate=#{rate}"
    { totals: totals, failures: failures, eur: (totals.values.sum * rate).round(2) }
  end

  worker.step("region.total", retry: 1) do |input, _ctx|
    rows = SALES[input["region"]]
    raise Switchyard::PermanentError, "no sales ledger for region #{input['region']}" if rows.nil?

    rows.sum
  end

  worker.step("fx.rate") { 0.5 }
end

store = nil
OptionParser.new { |o| o.on("--store URL", "store URL (default: a fresh temporary SQLite file)") { |v| store = v } }.parse!
tmp = nil
unless store
  tmp = Dir.mktmpdir("switchyard-delegation-")
  store = "sqlite:#{File.join(tmp, 'report.db')}"
end
$stdout.sync = true
worker = Switchyard::Worker.new(store: store, concurrency: 8)
build(worker)
client = Switchyard::Client.new(store: store)
worker.start
begin
  # A caller elsewhere waits for the report through its response event.
  task = client.spawn("report.build", { regions: SALES.keys }, response_event: "report.ready")
  puts "spawned report.build #{task}"
  result = client.result(task, timeout: 30)
  raise "totals #{result}" unless result["totals"] == { "north" => 200, "south" => 200, "east" => 125 }
  raise "failures #{result}" unless result["failures"].keys == ["atlantis"]
  raise "eur #{result}" unless result["eur"] == 262.5

  event = client.events.find { |e| e["name"] == "report.ready" }
  raise "the response event was not emitted" unless event

  puts "result: #{result}"
  puts "response event report.ready: #{event['payload']}"
ensure
  worker.stop
  FileUtils.rm_rf(tmp) if tmp
end
