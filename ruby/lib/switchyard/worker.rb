# frozen_string_literal: true

module Switchyard
  # A host for Ruby handlers.
  #
  #   worker = Switchyard::Worker.new(store: "sqlite:app.db", concurrency: 32)
  #   worker.step("greet") { |input, ctx| { hello: input["name"] } }
  #   worker.run # Ctrl-C / SIGTERM shut down gracefully
  #
  # Handlers run on a pool of Ruby threads that wait for work inside Rust
  # without the GVL and take jobs in batches (one GVL acquisition per
  # batch). The core enforces timeouts, leases and retries. The main thread
  # only waits (for a signal or #stop), so Ctrl-C and SIGTERM are seen at
  # once.
  #
  # What a handler raises:
  # * a StandardError (or any Exception other than those below) fails only
  #   its step, retried per the handler's retry policy; an exception whose
  #   +#message+ itself raises is recorded as
  #   <tt>#<BadError: message raised RuntimeError></tt>;
  # * +Interrupt+, any other +SignalException+, or +SystemExit+ (+exit+ in a
  #   handler) stops the worker gracefully, as #stop does: its step is
  #   handed back without costing an attempt (the core releases it within
  #   about two seconds; a batch when +shutdown_grace+ is over) and runs
  #   again later, and other running steps get +shutdown_grace+ to finish.
  #   A warning names the exception. #run then re-raises it once stopped
  #   (so +exit 3+ in a handler ends a #run-based program with status 3
  #   after a graceful stop); after #start, #stop_cause returns it.
  #
  # A handler thread that dies anyway (+Thread#kill+, an exception in the
  # glue) is replaced at once, with a warning, and the steps it held are
  # answered with a retryable error naming what happened, so they run
  # again now rather than staying +running+ until a timeout.
  class Worker
    Handler = Struct.new(:name, :kind, :block)

    COMMON = %i[concurrency timeout retry].freeze
    OPTIONS = {
      step: COMMON, decision: COMMON,
      batch: COMMON + %i[max_batch linger],
      api: COMMON + %i[rate_limit burst]
    }.freeze

    attr_reader :store

    # The Interrupt, SignalException or SystemExit that a handler raised and
    # that stopped the worker (nil otherwise).
    attr_reader :stop_cause

    DEFER_CANCEL = { Interrupted => :never }.freeze
    ALLOW_CANCEL = { Interrupted => :immediate }.freeze
    private_constant :DEFER_CANCEL, :ALLOW_CANCEL

    # +threads+: Ruby threads serving handlers (default: concurrency, at
    # most 16). +batch+: most jobs a thread takes at once (default 1: a
    # thread running blocks keeps taking queued jobs one by one without
    # giving up the GVL, and no job waits behind a slow block on its thread).
    def initialize(store: nil, concurrency: 64, threads: nil, lease: 30.0, shutdown_grace: 10.0,
                   max_payload_bytes: nil, batch: 1, health_listen: nil)
      store = (store || Switchyard.default_store).to_s
      native = Native::Worker.new(store, Integer(concurrency), Float(lease), Float(shutdown_grace), max_payload_bytes,
                                  health_listen&.to_s)
      setup(native, threads, batch)
    end

    # A worker configured like every Switchyard host: the file at +path+
    # (a String or Pathname), else the one named by SWITCHYARD_CONFIG, else
    # none, then the SWITCHYARD_* environment variables (SWITCHYARD_STORE,
    # SWITCHYARD_HOST__CONCURRENCY, ...). It uses the configured store
    # ([store]) and host settings ([host]: concurrency, lease, heartbeat,
    # shutdown_grace). An unknown key or a value of the wrong type raises
    # Switchyard::ConfigError naming the key and where it came from.
    def self.from_config(path = nil, threads: nil, batch: 1)
      native = Native::Worker.from_config(path.nil? ? nil : File.path(path))
      worker = allocate
      worker.send(:setup, native, threads, batch)
      worker
    end

    private def setup(native, threads, batch)
      @native = native
      @store = native.store_url
      concurrency = native.concurrency
      @handlers = [] # by handler id (what Native::Worker#register returns)
      @threads_n = Integer(threads || [concurrency, 16].min)
      raise ArgumentError, "threads must be at least 1" if @threads_n < 1

      @batch = Integer(batch)
      @threads = []
      @state = :new
      @lock = Mutex.new
      @finished = Queue.new # closed once stopped
      # Job id => the thread running its block, for push cancellation.
      @running = {}
      @running_lock = Mutex.new
    end

    # Registers a plain handler: the block gets (input, ctx) and returns
    # the result. Options: concurrency:, timeout: (seconds), retry:
    # (max attempts, or a Switchyard::Retry / Hash).
    def step(name, **opts, &block)
      register(name, :step, opts, block)
    end

    # Registers a batch handler: the block gets an Array of
    # Switchyard::BatchItem (input, ctx) and returns one result (or an
    # Exception) per item. Options: max_batch:, linger: (seconds).
    def batch(name, **opts, &block)
      register(name, :batch, opts, block)
    end

    # Registers a decision handler: the block returns a Switchyard::Decision.
    def decision(name, **opts, &block)
      register(name, :decision, opts, block)
    end

    # Registers an API-shaped handler: raise Switchyard::HttpError or
    # Switchyard::NetworkError for failures. rate_limit: starts per second.
    def api(name, **opts, &block)
      register(name, :api, opts, block)
    end

    def host_id
      @native.host_id
    end

    # Where /healthz, /readyz and /metrics are served once started with
    # +health_listen: "127.0.0.1:9464"+ (port 0 picks a free port), else nil.
    def health_addr
      @native.health_addr
    end

    def running?
      @state == :running
    end

    # Starts serving on background threads and returns self.
    def start
      @lock.synchronize do
        raise ConfigError, "the worker was already started" unless @state == :new
        raise ConfigError, "register at least one handler before starting the worker" if @handlers.empty?

        @native.start
        @state = :running
        @pid = Process.pid
      end
      Worker.track(self)
      @lock.synchronize do
        @respawn = true
        @threads = Array.new(@threads_n) { |i| supervised("switchyard-#{i}") { serve } }
        @threads << supervised("switchyard-cancel") { watch_cancels }
      end
      self
    end

    # Graceful shutdown: no more claims; running steps get the grace
    # period, then are handed back. Blocks until done (also when another
    # thread is already stopping the worker).
    def stop
      first = @lock.synchronize do
        case @state
        when :running
          @state = :stopping
          true
        when :stopping then false
        else return nil
        end
      end
      unless first
        @finished.pop # nil once the first caller has finished
        return nil
      end
      begin
        # Handler threads keep serving while the core drains; the inbox
        # closes afterwards and the threads see nil and exit.
        @native.stop
        @lock.synchronize { @respawn = false }
        join_threads(Process.clock_gettime(Process::CLOCK_MONOTONIC) + 5)
      ensure
        @state = :stopped
        @finished.close
        Worker.untrack(self)
      end
      nil
    end

    # Serves until SIGINT (Ctrl-C) or SIGTERM, or until #stop is called
    # from another thread, then shuts down gracefully (running steps get
    # +shutdown_grace+ seconds). Starts the worker if #start was not called.
    # The signal handlers in place before are restored afterwards.
    def run
      signals = Queue.new
      previous = {}
      %w[INT TERM].each do |sig|
        previous[sig] = Signal.trap(sig) { signals << sig }
      end
      start unless running?
      waiter = Thread.new do
        @finished.pop
        signals << :stopped
      end
      signals.pop
      waiter.kill
      # Stop on a helper thread: the main thread keeps only waiting (in
      # Ruby, where signals reach it), never blocked inside Rust.
      Thread.new { stop }.join
      raise @stop_cause if @stop_cause

      nil
    ensure
      previous&.each { |sig, handler| Signal.trap(sig, handler || "DEFAULT") }
    end

    private

    # Joins every handler thread (replacements included) by +deadline+,
    # killing those still running then: a handler that ignores cancellation
    # past the grace period is left no further, its step was already handed
    # back. A thread that died with an exception is reported, not raised.
    def join_threads(deadline)
      joined = {}
      loop do
        pending = @lock.synchronize { @threads.reject { |t| joined[t] } }
        break if pending.empty?

        pending.each do |t|
          joined[t] = true
          begin
            left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
            t.kill unless t.join([left, 0].max)
          rescue Exception => e # rubocop:disable Lint/RescueException
            # Raised by join on behalf of the dead thread; anything else
            # (an interrupt of the stopping thread) goes on.
            raise if t.alive? || !t.status.nil?

            warn "switchyard: handler thread #{t.name} had died with #{Worker.class_of(e)}: #{Worker.message_of(e)}"
          end
        end
      end
    end

    # A handler thread running +body+ that is replaced if it ends while the
    # worker serves (killed, or an exception escaped the serving loop).
    def supervised(name, &body)
      Thread.new do
        Thread.current.name = name
        Thread.current.report_on_exception = false
        clean = false
        begin
          body.call
          clean = true
        rescue Exception => e # rubocop:disable Lint/RescueException
          nil
        ensure
          replace(Thread.current, name, e, &body) unless clean
        end
      end
    end

    def replace(dead, name, cause, &body)
      @lock.synchronize do
        how = cause ? "died with #{Worker.class_of(cause)}: #{Worker.message_of(cause)}" : "was killed"
        unless @respawn
          warn "switchyard: handler thread #{name} #{how} while the worker stopped" if cause
          return
        end
        warn "switchyard: handler thread #{name} #{how}; starting a new one"
        fresh = supervised(name, &body)
        i = @threads.index(dead)
        i ? @threads[i] = fresh : @threads << fresh
      end
    rescue ThreadError => e # e.g. the VM is exiting
      warn "switchyard: could not replace handler thread #{name}: #{e.message}"
    end

    # A handler raised Interrupt, SignalException or SystemExit: hand its
    # job back and stop the worker (from another thread: #stop joins this
    # one).
    def stop_for(job, e)
      job.hand_back
      first = @lock.synchronize do
        next false if @stop_cause || @state != :running

        @stop_cause = e
        true
      end
      return unless first

      warn "switchyard: a handler raised #{e.class} (#{Worker.message_of(e)}); stopping the worker, its step is handed back"
      Thread.new { stop }
    end

    def stop_at_exit
      stop if @pid == Process.pid
    end

    def register(name, kind, opts, block)
      raise ArgumentError, "#{kind}(#{name.inspect}) needs a block" unless block
      raise ConfigError, "register handlers before the worker starts" unless @state == :new

      unknown = opts.keys - OPTIONS.fetch(kind)
      raise ArgumentError, "#{kind}(#{name.inspect}): unknown option #{unknown.map(&:inspect).join(', ')} (allowed: #{OPTIONS.fetch(kind).join(', ')})" unless unknown.empty?

      name = name.to_s
      native = opts.reject { |k, _| k == :retry }
      case (r = opts[:retry])
      when nil then nil
      when Integer then native[:max_attempts] = r
      when Retry, Hash
        h = r.to_h.transform_keys(&:to_sym)
        native[:max_attempts] = h[:max_attempts]
        native[:initial_backoff] = h[:initial_backoff]
        native[:max_backoff] = h[:max_backoff]
      else raise ArgumentError, "#{kind}(#{name.inspect}): retry must be an Integer, a Switchyard::Retry or a Hash"
      end
      id = @native.register(name, kind.to_s, native)
      @handlers[id] = Handler.new(name, kind, block)
      self
    end

    def serve
      native = @native
      handlers = @handlers
      batch = @batch
      consumer = native.consumer
      while (jobs = native.next_jobs(consumer, batch, 1.0))
        done = false
        begin
          jobs.each do |job, id, input, ctx|
            # Taken in a batch: the core may have given up on a later job
            # (timed out, cancelled) before its turn; it never starts then.
            next if job.abandoned?

            run_job(handlers.fetch(id), job, input, ctx)
          end
          done = true
        ensure
          # The thread is dying with jobs of this batch unanswered.
          jobs.each { |job, *| job.release("the handler thread ended before answering (killed, or an error in the glue)") } unless done
        end
      end
    end

    # Push cancellation: when the core cancels a run (the task was
    # cancelled, the handler timed out, or shutdown passed its grace
    # period), the thread running the block gets Switchyard::Cancelled
    # raised into it (also out of a durable operation it waits in).
    def watch_cancels
      native = @native
      while (ids = native.next_cancels(1.0))
        ids.each do |id|
          @running_lock.synchronize do
            @running[id]&.raise(Interrupted.new("the step was cancelled (task cancelled, timed out or shutting down)"))
          end
        end
      end
    end

    # Calls the block where (and only where) a cancellation may interrupt it.
    def call_cancellable(job, h, input, ctx)
      id = job.id
      Thread.handle_interrupt(DEFER_CANCEL) do
        @running[id] = Thread.current
        begin
          Thread.handle_interrupt(ALLOW_CANCEL) { h.block.call(input, ctx) }
        ensure
          @running_lock.synchronize { @running.delete(id) }
          absorb_late_interrupt
        end
      end
    end

    # A cancellation that arrived after the block returned belongs to the
    # finished job: drop it rather than let it hit the serving loop.
    def absorb_late_interrupt
      return unless Thread.pending_interrupt?(Interrupted)

      Thread.handle_interrupt(ALLOW_CANCEL) { Thread.pass }
    rescue Interrupted
      nil
    end

    def run_job(h, job, input, ctx)
      answer(h, job, input, ctx)
    ensure
      # Reached with the job unanswered only if the thread is being killed
      # (or the glue failed): hand the step back for a retry now rather
      # than when its timeout fires.
      job.release("the #{h.kind} handler `#{h.name}` was interrupted before answering (its thread was killed)")
    end

    # Answers +job+ through the native constructors (the core builds the
    # reply): a value, a decision, or the exception the block raised.
    def answer(h, job, input, ctx)
      case h.kind
      when :step, :api
        begin
          value = call_cancellable(job, h, input, ctx)
        rescue Exception => e # rubocop:disable Lint/RescueException
          fail_job(job, e)
        else
          job.ok(value)
        end
      when :decision
        begin
          d = call_cancellable(job, h, input, ctx)
        rescue Exception => e # rubocop:disable Lint/RescueException
          fail_job(job, e)
        else
          if !d.is_a?(Decision)
            fail_job(job, PermanentError.new("decision handler `#{h.name}` returned #{Worker.class_of(d)}, not Switchyard::Decision"))
          elsif d.complete?
            job.complete(d.value)
          else
            job.decide(d.steps, d.final_step)
          end
        end
      when :batch
        items = input.map { |i, c| BatchItem.new(i, c) }
        begin
          results = h.block.call(items).to_a
        rescue Exception => e # rubocop:disable Lint/RescueException
          fail_job(job, e)
        else
          if results.size == items.size
            job.finish(results, results.map { |r| r.is_a?(Exception) ? Worker.render(r) : nil })
          else
            fail_job(job, PermanentError.new("batch handler `#{h.name}` returned #{results.size} results for #{items.size} steps"))
          end
        end
      end
    end

    # Answers every step of +job+ with exception +e+ raised by its handler.
    def fail_job(job, e)
      if Worker.stops_process?(e)
        stop_for(job, e)
      else
        job.fail(e, *Worker.render(e))
      end
    end

    @live = {}
    @live_lock = Mutex.new

    class << self
      # @api private
      # Workers still running when the program exits are stopped gracefully
      # (in the process that started them), so their host deregisters and
      # running steps finish or are handed back at once, not after their
      # leases expire.
      def track(worker)
        @live_lock.synchronize do
          at_exit { Worker.stop_all } if @live.empty? && !@at_exit
          @at_exit = true
          @live[worker] = true
        end
      end

      # @api private
      def untrack(worker)
        @live_lock.synchronize { @live.delete(worker) }
      end

      # @api private
      def stop_all
        @live_lock.synchronize { @live.keys }.each { |w| w.send(:stop_at_exit) }
      end

      # @api private
      # True for exceptions that mean "stop the process" (see the class docs).
      def stops_process?(e)
        e.is_a?(SignalException) || e.is_a?(SystemExit)
      end

      # @api private
      # [message, backtrace] of +e+ as stored on the step. Never raises.
      def render(e)
        [message_of(e), trace(e)]
      end

      # @api private
      # +e.message+ as a String, or a placeholder if it raises (or its
      # +#to_s+ does).
      def message_of(e)
        m = e.message
        m.is_a?(String) ? m : String(m)
      rescue Exception => x # rubocop:disable Lint/RescueException
        "#<#{class_of(e)}: message raised #{class_of(x)}>"
      end

      # The name of +e+'s class, without calling anything +e+ overrides.
      def class_of(e)
        Kernel.instance_method(:class).bind_call(e).name || "Exception"
      rescue Exception # rubocop:disable Lint/RescueException
        "Exception"
      end

      # The Ruby backtrace as stored on the step.
      def trace(e)
        lines = ["#{class_of(e)}: #{message_of(e)}"]
        bt = begin
          e.backtrace
        rescue Exception # rubocop:disable Lint/RescueException
          nil
        end
        lines.concat(Array(bt).map { |l| "    #{l}" })
        lines.join("\n")
      end
    end
  end
end
