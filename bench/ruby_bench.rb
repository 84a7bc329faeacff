#!/usr/bin/env ruby
# frozen_string_literal: true

# Ruby counterpart of `switchyard bench` (noop workload): prints one JSON
# line on stdout, progress on stderr.
#
#   ruby bench/ruby_bench.rb --store sqlite --steps 50000 [--threads 4]
#
# Needs the `switchyard` gem installed (`bench/run --lang ruby` builds and
# installs it into target/ruby-gems). Two phases, as in the Rust benchmark:
#
# 1. Throughput: --steps N tasks are spawned with Client#spawn_many in
#    batches of --batch B while one worker runs them (--concurrency C steps
#    at once on --threads T Ruby threads); the clock runs from the first
#    spawn until the block has counted N runs and the store confirms N
#    completed steps.
# 2. Latency: --trials single tasks one after another on the idle worker,
#    from the start of the spawn call to the start of the block.

require "json"
require "optparse"
require "securerandom"
require "tmpdir"
require "timeout"
require "fileutils"
require "switchyard"

opts = { store: "sqlite", steps: 100_000, concurrency: 256, batch: 1000, trials: 200, threads: 4 }
OptionParser.new do |o|
  o.on("--store URL", "memory, sqlite (fresh temporary file) or a store URL") { |v| opts[:store] = v }
  o.on("--steps N", Integer) { |v| opts[:steps] = v }
  o.on("--concurrency N", Integer) { |v| opts[:concurrency] = v }
  o.on("--batch N", Integer, "tasks per spawn_many call") { |v| opts[:batch] = v }
  o.on("--trials N", Integer) { |v| opts[:trials] = v }
  o.on("--threads N", Integer, "Ruby threads serving the handler") { |v| opts[:threads] = v }
  o.on("--workload NAME", "noop only") { |v| abort "ruby_bench: only the noop workload is implemented" unless v == "noop" }
end.parse!

def progress(msg)
  warn msg
end

def percentile_ms(samples, p)
  return nil if samples.empty?

  s = samples.sort
  i = [[((p / 100.0) * (s.size - 1)).round, 0].max, s.size - 1].min
  (s[i] * 1000.0).round(3)
end

def now
  Process.clock_gettime(Process::CLOCK_MONOTONIC)
end

url = opts[:store]
tmp = nil
if url == "sqlite"
  tmp = Dir.mktmpdir("switchyard-bench-")
  url = "sqlite:#{File.join(tmp, 'bench.db')}"
end
kind = url.split(":", 2).first
run = SecureRandom.hex(4)
tp_name = "bench.#{run}.noop"
lat_name = "bench.#{run}.latency"
steps = opts[:steps]

worker = Switchyard::Worker.new(store: url, concurrency: opts[:concurrency] + 8, threads: opts[:threads], shutdown_grace: 2)
client = Switchyard::Client.new(store: url)
lock = Mutex.new
counted = 0
all_ran = Queue.new
started = {}
started_cv = ConditionVariable.new

worker.step(tp_name, concurrency: opts[:concurrency]) do |_input, _ctx|
  lock.synchronize do
    counted += 1
    all_ran << true if counted == steps
  end
  nil
end
worker.step(lat_name, concurrency: 8) do |input, _ctx|
  lock.synchronize do
    started[input["i"]] = now
    started_cv.broadcast
  end
  nil
end

seconds = nil
samples = []
worker.start
begin
  base = client.count_steps.fetch("completed", 0)
  progress "throughput: #{steps} steps, #{opts[:threads]} Ruby threads, store #{kind}"
  t0 = now
  (0...steps).step(opts[:batch]) do |start|
    n = [opts[:batch], steps - start].min
    client.spawn_many(Array.new(n) { { handler: tp_name } })
  end
  Timeout.timeout(600) { all_ran.pop }
  sleep 0.002 while client.count_steps.fetch("completed", 0) - base < steps
  seconds = now - t0

  progress "latency: #{opts[:trials]} trials on an idle host"
  opts[:trials].times do |i|
    t = now
    id = client.spawn(lat_name, { i: i })
    lock.synchronize do
      deadline = t + 30
      started_cv.wait(lock, deadline - now) until started.key?(i) || now > deadline
      raise "latency trial #{i}: the handler did not start" unless started.key?(i)

      samples << (started[i] - t)
    end
    client.wait(id, timeout: 30)
  end
ensure
  worker.stop
  FileUtils.rm_rf(tmp) if tmp
end

puts JSON.generate({
  lang: "ruby", store: kind, workload: "noop", steps: steps, concurrency: opts[:concurrency],
  threads: opts[:threads], batch: opts[:batch], seconds: seconds.round(3),
  steps_per_sec: (steps / seconds).round, trials: samples.size,
  p50_ms: percentile_ms(samples, 50), p99_ms: percentile_ms(samples, 99)
})
