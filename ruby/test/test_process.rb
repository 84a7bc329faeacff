# frozen_string_literal: true

require_relative "helper"

# Real signals sent to real `ruby` processes running the installed gem.
class TestProcess < Minitest::Test
  include SwitchyardTest

  SERVE = <<~RUBY
    require "switchyard"
    $stdout.sync = true
    worker = Switchyard::Worker.new(store: ARGV[0], concurrency: 4, threads: 2, shutdown_grace: 10)
    worker.step("slow") do |input, _ctx|
      puts "running"
      sleep input["seconds"]
      { "slept" => input["seconds"] }
    end
    Thread.new do
      Thread.pass until worker.running?
      puts "ready"
    end
    worker.run
    puts "stopped cleanly"
  RUBY

  def spawn_ruby(code, *args)
    out_r, out_w = IO.pipe
    pid = Process.spawn(gem_env, RbConfig.ruby, ruby_script(code), *args, out: out_w, err: File.join(@dir, "stderr.log"))
    out_w.close
    [pid, out_r]
  end

  def expect_line(io, line, timeout = WAIT)
    Timeout.timeout(timeout) do
      while (l = io.gets)
        return if l.chomp == line
      end
    end
    flunk "the child closed stdout before printing #{line.inspect}; stderr: #{File.read(File.join(@dir, 'stderr.log'))}"
  rescue Timeout::Error
    flunk "no #{line.inspect} within #{timeout} s"
  end

  def wait_exit(pid, timeout = WAIT)
    Timeout.timeout(timeout) { Process.wait2(pid)[1] }
  rescue Timeout::Error
    Process.kill("KILL", pid)
    Process.wait(pid)
    flunk "the process did not exit within #{timeout} s of the signal (killed it)"
  end

  def test_sigterm_drains_the_running_step_and_exits_cleanly
    pid, out = spawn_ruby(SERVE, @store)
    expect_line(out, "ready")
    id = client.spawn("slow", { seconds: 0.5 })
    expect_line(out, "running")
    Process.kill("TERM", pid)
    status = wait_exit(pid)
    assert status.success?, "exit status #{status.inspect}; stderr: #{File.read(File.join(@dir, 'stderr.log'))}"
    assert_equal "stopped cleanly", out.read.strip
    # The step in flight when the signal came finished within the grace period.
    assert_equal({ "slept" => 0.5 }, client.result(id, timeout: WAIT))
    assert_empty client.workers, "the host deregistered"
  end

  def test_sigint_stops_an_idle_worker
    pid, out = spawn_ruby(SERVE, @store)
    expect_line(out, "ready")
    Process.kill("INT", pid)
    status = wait_exit(pid)
    assert status.success?, status.inspect
    assert_equal "stopped cleanly", out.read.strip
  end

  def test_ctrl_c_interrupts_a_main_thread_blocked_in_rust
    code = <<~RUBY
      require "switchyard"
      $stdout.sync = true
      client = Switchyard::Client.new(store: ARGV[0])
      id = client.spawn("nobody.serves.this")
      begin
        puts "waiting"
        client.result(id, timeout: 120)
      rescue Interrupt
        puts "interrupted"
        exit 0
      end
      puts "not interrupted"
      exit 1
    RUBY
    pid, out = spawn_ruby(code, @store)
    expect_line(out, "waiting")
    # The child may not be inside the blocking call yet: repeat the signal
    # until it reacts (each one would interrupt it).
    status = nil
    Timeout.timeout(WAIT) do
      loop do
        Process.kill("INT", pid)
        break if (status = Process.wait2(pid, Process::WNOHANG)&.last) || IO.select([out], nil, nil, 0.2)
      end
    end
    status ||= wait_exit(pid)
    assert status.success?, "exit status #{status.inspect}; stderr: #{File.read(File.join(@dir, 'stderr.log'))}"
    assert_equal "interrupted", out.read.strip
  end

  def test_thread_kill_and_raise_interrupt_a_thread_blocked_in_rust
    id = client.spawn("nobody.serves.this")
    entered = Queue.new
    t = Thread.new do
      entered << true
      client.result(id, timeout: 120)
    end
    pop(entered)
    Thread.pass until t.status == "sleep" || !t.alive?
    t.kill
    assert_same t, t.join(WAIT), "Thread#kill ended the blocked call"
    refute t.alive?

    r = Thread.new do
      client.result(id, timeout: 120)
    rescue RuntimeError => e
      e.message
    end
    Thread.pass until r.status == "sleep" || !r.alive?
    r.raise(RuntimeError, "stop waiting")
    assert_same r, r.join(WAIT)
    assert_equal "stop waiting", r.value
  end

  def test_a_worker_left_running_is_stopped_gracefully_at_exit
    code = <<~RUBY
      require "switchyard"
      $stdout.sync = true
      w = Switchyard::Worker.new(store: ARGV[0], shutdown_grace: 10)
      started = Queue.new
      w.step("slow") { |_i, _c| started << true; sleep 0.3; "finished during shutdown" }
      w.start
      Switchyard::Client.new(store: ARGV[0]).spawn("slow")
      started.pop
      puts "exiting"
      # no w.stop: the program just ends
    RUBY
    out, err, status = Timeout.timeout(WAIT) { Open3.capture3(gem_env, RbConfig.ruby, ruby_script(code), @store) }
    assert status.success?, err
    assert_equal "exiting", out.strip
    assert_empty client.workers, "the host deregistered at exit"
    t = client.list.first
    assert_equal "finished during shutdown", client.result(t["id"], timeout: WAIT)
  end

  def test_core_logs_go_to_stderr_filtered_by_switchyard_log
    code = <<~RUBY
      require "switchyard"
      w = Switchyard::Worker.new(store: ARGV[0])
      w.step("x") { 1 }
      w.start
      w.stop
    RUBY
    script = ruby_script(code)
    _out, err, status = Open3.capture3(gem_env.merge("SWITCHYARD_LOG" => "switchyard_core=info"), RbConfig.ruby, script, @store)
    assert status.success?, err
    assert_match(/INFO switchyard_core::worker(::\w+)*: host started/, err)
    assert_match(/host stopped/, err)
    _out, err, status = Open3.capture3(gem_env.merge("SWITCHYARD_LOG" => nil), RbConfig.ruby, script, @store)
    assert status.success?, err
    refute_match(/host started/, err, "info records are filtered out by default")
  end

  # A forked child creates its own client and worker (the core starts a
  # runtime for it; the parent's is left alone), starts a worker made
  # before fork, works on the same file and exits normally; a client made
  # in the parent fails clearly there.
  FORK = <<~RUBY
    require "switchyard"
    $stdout.sync = true
    store = ARGV[0]
    parent = Switchyard::Client.new(store: store)
    parent.spawn("x", { "from" => "parent" })
    early = Switchyard::Worker.new(store: store, threads: 1, shutdown_grace: 1) # made before fork, started after
    early.step("triple") { |i, _ctx| i * 3 }
    pid = fork do
      begin
        parent.list
        puts "parent client in child: no error"
      rescue Switchyard::Error => e
        puts "parent client in child: \#{e.message}"
      end
      c = Switchyard::Client.new(store: store)
      puts "child task: \#{c.spawn("x", { "from" => "child" })}"
      w = Switchyard::Worker.new(store: store, threads: 2, shutdown_grace: 1)
      w.step("double") { |i, _ctx| i * 2 }
      w.start
      puts "child result: \#{c.result(c.spawn("double", 21), timeout: 20)}"
      early.start
      puts "early worker in child: \#{c.result(c.spawn("triple", 5), timeout: 20)}"
      early.stop
      w.stop
      exit 0
    end
    _, status = Process.wait2(pid)
    puts "child exit: \#{status.exitstatus.inspect}"
    puts "parent after fork: \#{parent.list.size}"
  RUBY

  def test_a_forked_child_creates_its_own_client_and_worker
    out, err, status = Open3.capture3(gem_env, "timeout", "-k", "5", "60", RbConfig.ruby, ruby_script(FORK), @store)
    assert status.success?, "exit #{status.exitstatus}; stdout: #{out}; stderr: #{err}"
    assert_match(/^child exit: 0$/, out, err)
    assert_match(/^parent client in child: this switchyard object was created in process \d+ and cannot be used in a forked child/, out)
    assert_match(/^child result: 42$/, out)
    assert_match(/^early worker in child: 15$/, out)
    assert_match(/^parent after fork: 4$/, out)
    child_task = out[/^child task: (\S+)$/, 1]
    refute_nil child_task, out
    assert_equal({ "from" => "child" }, client.get(child_task)["input"])
  end
end
