# frozen_string_literal: true

module Switchyard
  # The durable context handed to every handler (defined in Rust; the block
  # forms and keyword arguments are added here). Every operation waits for
  # the core without holding the GVL.
  class Context
    # Ends this run with +status+ when the handler returns a value: the
    # steps the decision routed from that status are created (see +routes:+
    # in Switchyard.step) and the status is recorded with the step. Without
    # a call the status is "ok"; the last call wins. A status the step has
    # no route for fails the step; a status that is not a name raises
    # Switchyard::InvalidInput.
    def set_status(status)
      _set_status(status.to_s)
    end

    # Runs the block once per task, ever: a replay returns the stored value
    # without running it. The value comes back as JSON would (string keys),
    # on the first run too, so first runs and replays agree.
    def checkpoint(name)
      raise ArgumentError, "checkpoint(#{name.inspect}) needs a block" unless block_given?

      key, found, value = _checkpoint_lookup(name.to_s)
      return value if found

      _checkpoint_save(key, yield)
    end

    # The payload of event +name+ (emitted before or after this call). The
    # step suspends (freeing its slot) until the event arrives; after
    # +timeout+ seconds raises Switchyard::AwaitTimeout (checkpointed).
    def await_event(name, timeout: nil)
      _await_event(name.to_s, timeout.nil? ? nil : Float(timeout))
    end

    # Durable sleep: the step suspends and the host is free meanwhile.
    def sleep(seconds)
      _sleep(Float(seconds))
    end

    # Durable sleep until +time+ (a Time, or milliseconds since the epoch).
    # The step replays after waking, so +time+ must be the same on every
    # run: take it from the input or a checkpoint, not from Time.now.
    def sleep_until(time)
      ms = time.is_a?(Time) ? (time.to_r * 1000).to_i : Integer(time)
      _sleep_until_ms(ms)
    end

    # Emits an event (first write wins); true if this call stored it.
    def emit_event(name, payload = nil)
      _emit_event(name.to_s, payload)
    end
    alias emit emit_event

    # Spawns a child task without waiting for it; returns its id. With
    # +response_event:+, the child's outcome is emitted as that event when
    # it finishes (payload: { "task_id", "state", "result", "error" }).
    def spawn(handler, input = nil, response_event: nil)
      _spawn(handler.to_s, input, response_event&.to_s)
    end

    # Runs a child task and returns its result (the step suspends meanwhile);
    # a failed child fails this step permanently.
    def delegate(handler, input = nil)
      _delegate(handler.to_s, input)
    end

    # Runs child tasks in parallel; +children+ are [handler, input] pairs or
    # hashes with :handler and :input. Returns one Hash per child, in order,
    # with "task_id", "state", "result" and "error" (failures per child).
    def delegate_parallel(children)
      pairs = children.each_with_index.map do |c, i|
        case c
        when Array then [c.fetch(0).to_s, c[1]]
        when Hash then [(c[:handler] || c["handler"] || raise(ArgumentError, "child ##{i} has no handler")).to_s, c[:input] || c["input"]]
        else raise ArgumentError, "child ##{i} must be [handler, input] or {handler:, input:}, not #{c.class}"
        end
      end
      _delegate_parallel(pairs)
    end

    # Deprecated: the old name of #step_name.
    def step
      step_name
    end

    def inspect
      "#<Switchyard::Context task=#{task_id} step=#{step_name} attempt=#{attempt}>"
    end
    alias to_s inspect
  end
end
