# frozen_string_literal: true

module Switchyard
  VERSION = "0.1.0"
end
