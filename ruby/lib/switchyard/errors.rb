# frozen_string_literal: true

module Switchyard
  # Base class of every switchyard exception.
  class Error < StandardError; end

  # The step failed and must not be retried. Raise it from a handler.
  class PermanentError < Error; end

  # The step failed but may succeed later; +retry_after+ (seconds) is a
  # minimum delay before the next attempt.
  class RetryableError < Error
    attr_reader :retry_after

    def initialize(message = nil, retry_after: nil)
      super(message)
      @retry_after = retry_after.nil? ? nil : Float(retry_after)
    end
  end

  # The input was rejected: the step fails at once, never retried. Also
  # raised by the client for malformed arguments.
  class InvalidInput < Error; end

  # A payload exceeded the configured size limit; nothing was stored.
  class PayloadTooLarge < InvalidInput; end

  # +ctx.await_event+ ran out of time (checkpointed: a replay raises it
  # again); +event+ names the event. A handler may rescue it; if it
  # escapes, the step fails permanently.
  class AwaitTimeout < Error
    attr_reader :event

    def initialize(message = nil, event: nil)
      super(message)
      @event = event
    end
  end

  # A client's wait ran out of time (+Client#result+, +Client#wait+): the
  # task is still running. Not the same as AwaitTimeout.
  class TimeoutError < Error; end

  # The task waited for (+Client#result+) failed. +task_id+, and the error
  # recorded for it: +kind+ ("permanent", "retryable", "timeout"...),
  # +traceback+ (the handler's backtrace, or nil), +attempt+ (the attempt it
  # happened on), +error_message+ (the recorded message alone, what
  # Python's +TaskFailed.message+ and TypeScript's +error.message+ hold).
  # +message+ is the core's whole sentence, which includes it.
  class TaskFailed < Error
    attr_reader :task_id, :kind, :error_message, :traceback, :attempt

    def initialize(message = nil, task_id: nil, kind: nil, error_message: nil, traceback: nil, attempt: nil)
      super(message)
      @task_id = task_id
      @kind = kind
      @error_message = error_message
      @traceback = traceback
      @attempt = attempt
    end
  end

  # The task waited for (+Client#result+) was cancelled.
  class TaskCancelled < Error
    attr_reader :task_id

    def initialize(message = nil, task_id: nil)
      super(message)
      @task_id = task_id
    end
  end

  # The task was cancelled: raised by durable operations of a cancelled run
  # (and, as Interrupted, into its thread). A handler that lets it escape
  # just stops.
  class Cancelled < Error; end

  # Raised into a handler's thread when the core cancels its run (push
  # cancellation): the task was cancelled, the handler timed out, or the
  # worker is shutting down past its grace period.
  class Interrupted < Cancelled; end

  # No task with that id exists.
  class NotFound < Error; end

  # The operation does not fit the task's state (e.g. retrying a running
  # task).
  class Conflict < Error; end

  # Invalid configuration: a bad store URL, option or registration.
  class ConfigError < Error; end

  # The store failed (usually transient).
  class StoreError < Error; end

  # The worker is shutting down.
  class ShutdownError < Error; end

  # The step's lease was lost (cancelled, or taken over by another host).
  # An Exception, not a StandardError, so that a bare +rescue+ in handler
  # code does not swallow it: the run must stop.
  class LeaseLost < Exception; end # rubocop:disable Lint/InheritException

  # Raised by durable operations to suspend the step (await, sleep,
  # delegation). Not an error: it unwinds the handler so its slot is freed,
  # and the step resumes later by replay; the core keeps what the step
  # waits for. An Exception, not a StandardError, so that a bare +rescue+
  # in handler code does not swallow it. Raised by hand (no durable
  # operation asked for it), it fails the step permanently.
  class Suspend < Exception; end # rubocop:disable Lint/InheritException

  # Raised by +worker.api+ handlers for a non-2xx answer: 429 is retried
  # after +retry_after+, other 4xx fail permanently, 5xx are retried.
  class HttpError < Error
    attr_reader :status, :retry_after, :body

    def initialize(status, body = "", retry_after: nil)
      @status = Integer(status)
      @body = body.to_s
      @retry_after = retry_after.nil? ? nil : Float(retry_after)
      super("HTTP #{@status}: #{@body}")
    end
  end

  # Raised by +worker.api+ handlers when the request got no answer (retried).
  class NetworkError < Error; end
end
