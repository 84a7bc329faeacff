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
  # again), or a client wait ran out of time. If a handler lets it escape,
  # the step fails permanently.
  class AwaitTimeout < Error; end

  # The same class under the name the core's client errors use.
  TimeoutError = AwaitTimeout

  # The task was cancelled.
  class Cancelled < Error; end

  # Raised into a handler's thread when the core cancels its run (push
  # cancellation): the task was cancelled, the handler timed out, or the
  # worker is shutting down past its grace period.
  class Interrupted < Cancelled; end

  # No task with that id exists.
  class NotFound < Error; end

  # The operation does not fit the task's state (retrying a running task,
  # asking for the result of a failed task).
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
  # and the step resumes later by replay. An Exception, not a StandardError,
  # so that a bare +rescue+ in handler code does not swallow it.
  class Suspend < Exception # rubocop:disable Lint/InheritException
    # The wait, as JSON understood by the core.
    def wait
      message
    end
  end

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
