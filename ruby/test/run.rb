# frozen_string_literal: true

# Runs test files given on the command line; arguments after `--` go to
# minitest (e.g. `-n /signal/`, `-v`). Used by mk/ruby.mk.
split = ARGV.index("--") || ARGV.size
files = ARGV[0...split]
ARGV.replace(ARGV[(split + 1)..] || [])
files.each { |f| require File.expand_path(f) }
