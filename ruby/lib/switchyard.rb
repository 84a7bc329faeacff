# frozen_string_literal: true

# Switchyard: a durable worker host. The Rust core (loaded from the native
# extension) owns dispatch, batching, retries, leases and durable workflow
# state; Ruby blocks run the steps.
#
#   require "switchyard"
#   worker = Switchyard::Worker.new(store: "sqlite:app.db")
#   worker.step("greet") do |input, ctx|
#     name = ctx.checkpoint("lookup") { input["name"] }
#     { hello: name }
#   end
#   worker.run
module Switchyard
  DEFAULT_STORE = "sqlite:switchyard.db"

  # The store URL from SWITCHYARD_STORE, or sqlite:switchyard.db.
  def self.default_store
    s = ENV["SWITCHYARD_STORE"]
    s.nil? || s.empty? ? DEFAULT_STORE : s
  end
end

require_relative "switchyard/version"
require_relative "switchyard/errors"
require_relative "switchyard/switchyard_native"
require_relative "switchyard/context"
require_relative "switchyard/decision"
require_relative "switchyard/client"
require_relative "switchyard/worker"
