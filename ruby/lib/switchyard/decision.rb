# frozen_string_literal: true

module Switchyard
  # What a +worker.decision+ handler returns: steps to create (with
  # dependencies by name), or +Decision.complete(value)+.
  class Decision
    attr_reader :steps, :final_step, :value

    def initialize(steps: [], final_step: nil, value: nil, done: false)
      @steps = steps
      @final_step = final_step
      @value = value
      @done = done
    end

    def complete?
      @done
    end

    # Nothing more to do: the task completes with +value+.
    def self.complete(value = nil)
      new(value: value, done: true)
    end

    # Creates +steps+ atomically (see Switchyard.step); +final_step+ names
    # the step whose result becomes the task's (default: the last one).
    def self.create(steps, final_step: nil)
      new(steps: steps.to_a, final_step: final_step&.to_s)
    end

    # Splits +total+ items into cursor ranges run as parallel +handler+
    # steps, then a +converge+ step that receives their results through
    # +ctx.dependency_results+ (planned by the core).
    # Bounded: +total+ must not be negative, +batch_size+ at least 1, and
    # the plan at most 100,000 steps (Switchyard::InvalidInput otherwise).
    def self.fan_out(handler, total, batch_size, input: nil, converge: "converge")
      plan = Native.fan_out(handler.to_s, Integer(total), Integer(batch_size), input, converge.to_s)
      return complete(plan["complete"]) if plan.key?("complete")

      new(steps: plan["steps"], final_step: plan["final_step"])
    end
  end

  # A step for a Decision; +handler+ defaults to +name+.
  # +routes+: { status => [steps] } — when the step completes with that
  # status (+ctx.set_status+; "ok" when it sets none) those steps are
  # created; a routed step with no +depends_on+ depends on this one. A
  # status with no route fails the step.
  def self.step(name, handler: nil, input: nil, depends_on: [], routes: nil)
    s = { "name" => name.to_s, "handler" => (handler || name).to_s, "input" => input,
          "depends_on" => depends_on.map(&:to_s) }
    s["routes"] = routes.to_h { |status, steps| [status.to_s, steps] } if routes
    s
  end

  # Retry policy: exponential backoff with jitter, up to +max_attempts+.
  Retry = Struct.new(:max_attempts, :initial_backoff, :max_backoff, keyword_init: true)

  # One step of a +worker.batch+ call.
  BatchItem = Struct.new(:input, :ctx)
end
