# frozen_string_literal: true

module Switchyard
  # Talks to a store: spawn tasks, emit events, wait for results, cancel,
  # retry, list and inspect. Thread-safe.
  #
  #   client = Switchyard::Client.new(store: "sqlite:app.db")
  #   id = client.spawn("greet", { "name" => "Ada" })
  #   client.result(id, timeout: 5) # => {"hello"=>"Ada"}
  class Client
    attr_reader :store

    def initialize(store_url = nil, store: nil, max_payload_bytes: nil)
      @store = (store || store_url || Switchyard.default_store).to_s
      @native = Native::Client.new(@store, max_payload_bytes)
    end

    # Spawns a task; returns its id (the first task's id when the
    # idempotency key was used before). +run_at+: a Time or epoch ms.
    def spawn(handler, input = nil, priority: 0, idempotency_key: nil, response_event: nil, headers: nil, run_at: nil)
      id, _created = @native.spawn(Client.task(handler: handler, priority: priority,
                                               idempotency_key: idempotency_key, response_event: response_event,
                                               headers: headers, run_at: run_at), input)
      id
    end

    # Spawns many tasks in one write; +tasks+ are hashes with :handler,
    # :input and optional :priority, :idempotency_key, :response_event,
    # :headers, :run_at. Nothing is spawned if any is invalid.
    def spawn_many(tasks)
      @native.spawn_many(tasks.to_a)
    end

    # Emits an event (first write wins); true if this call stored it.
    def emit(name, payload = nil)
      @native.emit(name.to_s, payload)
    end

    # Waits for the task and returns its result; raises
    # Switchyard::TaskFailed (with +task_id+, +kind+, +traceback+,
    # +attempt+) if it failed, Switchyard::TaskCancelled if it was
    # cancelled, Switchyard::TimeoutError if it is still running after
    # +timeout+ seconds. Other Ruby threads run while it waits.
    def result(task_id, timeout: 30)
      @native.result(task_id.to_s, Float(timeout))
    end

    # Waits, from outside any task, until event +name+ is emitted and
    # returns its payload (at once if it already was; the first emit wins):
    # how a caller waits for a task's +response_event+ (a Hash with
    # "task_id", "state", "result", "error") without polling.
    # Switchyard::TimeoutError naming the event after +timeout+ seconds;
    # Switchyard::InvalidInput for a bad name. Other Ruby threads run while
    # it waits.
    def await_event(name, timeout: 30)
      @native.await_event(name.to_s, Float(timeout))
    end

    # Waits until the task finishes and returns it (any final state);
    # Switchyard::TimeoutError after +timeout+ seconds.
    def wait(task_id, timeout: 30)
      @native.wait(task_id.to_s, Float(timeout))
    end

    # The task record.
    def get(task_id)
      @native.get(task_id.to_s)
    end

    # The task with its steps, checkpoints and children. Without an id,
    # Ruby's usual #inspect.
    def inspect(task_id = nil)
      return "#<Switchyard::Client store=#{@store}>" if task_id.nil?

      @native.inspect_task(task_id.to_s)
    end

    # Tasks, newest first.
    def list(state: nil, handler: nil, limit: 100)
      @native.list(state&.to_s, handler&.to_s, Integer(limit))
    end

    # Cancels a task (and with +cascade+ its descendants); false if it had
    # already finished.
    def cancel(task_id, cascade: false)
      @native.cancel(task_id.to_s, cascade ? true : false)
    end

    # Re-runs a failed or cancelled task.
    def retry(task_id)
      @native.retry(task_id.to_s)
      nil
    end

    # Registered hosts.
    def workers
      @native.workers
    end

    # Cached events, newest first; with +name:+, only those whose name
    # starts with it.
    def events(limit: 100, name: nil)
      @native.events(Integer(limit), name&.to_s)
    end

    # Steps per state, e.g. {"completed"=>3, ...}.
    def count_steps
      @native.count_steps
    end

    # @api private
    def self.task(handler:, priority: 0, idempotency_key: nil, response_event: nil, headers: nil, run_at: nil)
      { "handler" => handler.to_s, "priority" => priority,
        "idempotency_key" => idempotency_key, "response_event" => response_event,
        "headers" => headers, "run_at" => run_at }
    end
  end
end
