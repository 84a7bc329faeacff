# frozen_string_literal: true

require_relative "helper"

# Runs the reference scenarios in examples/ruby (each checks its own
# outcome and exits non-zero otherwise) against the installed gem.
class TestExamples < Minitest::Test
  include SwitchyardTest

  EXAMPLES = ENV["SWITCHYARD_EXAMPLES"] || File.expand_path("../../examples/ruby", __dir__)

  def run_example(name, *args)
    path = File.join(EXAMPLES, name)
    assert File.exist?(path), "#{path} exists (SWITCHYARD_EXAMPLES)"
    out, err, status = Timeout.timeout(120) do
      Open3.capture3(gem_env, RbConfig.ruby, path, "--store", @store, *args, chdir: @dir)
    end
    assert status.success?, "#{name} failed (#{status.inspect}):\n#{out}\n#{err}"
    out
  end

  def test_order_events
    out = run_example("order_events.rb")
    assert_match(/order\.ship\s+delivered \{"signed_by"=>"Ada"\}/, out)
    assert_match(/"status"=>"delivered"/, out)
  end

  def test_tour
    out = run_example("tour.rb")
    assert_includes out, <<~OUT
      shipped: {"label":"LABEL-bolt","total":10.0}
      backordered: {"backordered":3,"supplier":"on its way"}
      audit: ["LABEL-a","LABEL-b"]
      scan: cancelled
    OUT
  end

  # The gem's README shows examples/ruby/tour.rb verbatim.
  def test_the_gem_readme_shows_the_tour_as_it_runs
    readme = File.read(File.join(Gem.loaded_specs["switchyard"].full_gem_path, "README.md"))
    tour = File.read(File.join(EXAMPLES, "tour.rb"))
    assert_includes readme, "```ruby\n#{tour}```"
  end

  def test_delegation
    out = run_example("delegation.rb")
    assert_match(/"eur"=>262.5/, out)
    assert_match(/response event report\.ready/, out)
  end

  def test_inventory_cancel
    out = run_example("inventory_cancel.rb")
    assert_match(/order bolt x4: check ended `ok` on attempt 2: \{"shipped":4,"sku":"bolt"\}/, out)
    assert_match(/order nut x3: check ended `out_of_stock` on attempt 2: \{"backordered":2,"sku":"nut"\}/, out)
    assert_match(/inventory\.scan\(W1\): cancelled at bin \d+/, out)
    assert_match(/inventory\.scan\(W2\): cancelled at bin \d+/, out)
    assert_match(/done: scan stopped/, out)
  end

  def test_demo_worker_serves_invoices_and_stops_on_sigterm
    out_r, out_w = IO.pipe
    pid = Process.spawn(gem_env, RbConfig.ruby, File.join(EXAMPLES, "demo_worker.rb"), "--store", @store,
                        out: out_w, err: File.join(@dir, "demo.err"))
    out_w.close
    id = client.spawn("invoice.issue", { order: "A-7", amount: 63.5, currency: "EUR" })
    assert_equal({ "invoice" => "INV-A-7", "amount" => 63.5, "issued_by" => "ruby" }, client.result(id, timeout: WAIT))
    line = Timeout.timeout(WAIT) { out_r.gets }
    assert_equal "[ruby pid #{pid}] invoice.issue  issued INV-A-7 for 63.5 EUR", line.chomp
    Process.kill("TERM", pid)
    status = Timeout.timeout(WAIT) { Process.wait2(pid)[1] }
    assert status.success?, "#{status.inspect}: #{File.read(File.join(@dir, 'demo.err'))}"
    assert_empty client.workers
  ensure
    if pid && !status
      Process.kill("KILL", pid)
      Process.wait(pid)
    end
  end

  def test_demo_worker_needs_a_store
    _out, err, status = Open3.capture3(gem_env, RbConfig.ruby, File.join(EXAMPLES, "demo_worker.rb"))
    refute status.success?
    assert_match(/--store URL is required/, err)
  end
end
