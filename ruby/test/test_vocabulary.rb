# frozen_string_literal: true

require_relative "helper"

# The README's "Vocabulary" table names one concept the same way in every
# language; this reads its Ruby column and checks that every name exists in
# the installed gem: `A` is the constant Switchyard::A, `A#b` a public
# instance method b of Switchyard::A, `A.b` a singleton method.
class TestVocabulary < Minitest::Test
  README = File.expand_path("../../README.md", __dir__)

  def ruby_column
    lines = File.readlines(README, chomp: true)
    start = lines.index("## Vocabulary") or flunk "README has no ## Vocabulary section"
    rows = lines[(start + 1)..].drop_while { |l| !l.start_with?("|") }.take_while { |l| l.start_with?("|") }
    header = rows.first.split("|").map(&:strip)
    col = header.index("Ruby") or flunk "the vocabulary table has no Ruby column: #{header.inspect}"
    rows.drop(2).map { |r| [r.split("|").map(&:strip)[1], r.split("|").map(&:strip)[col]] }
  end

  def missing(name)
    case name
    when /\A(\w+)#(\w+[?!]?)\z/
      klass = Switchyard.const_get(Regexp.last_match(1), false) if Switchyard.const_defined?(Regexp.last_match(1), false)
      klass.is_a?(Module) && klass.public_method_defined?(Regexp.last_match(2)) ? nil : "Switchyard::#{name}"
    when /\A(\w+)\.(\w+[?!]?)\z/
      klass = Switchyard.const_get(Regexp.last_match(1), false) if Switchyard.const_defined?(Regexp.last_match(1), false)
      klass.respond_to?(Regexp.last_match(2)) ? nil : "Switchyard::#{name}"
    when /\A\w+\z/
      Switchyard.const_defined?(name, false) ? nil : "Switchyard::#{name}"
    else "unparsable name #{name.inspect}"
    end
  end

  def test_every_ruby_name_in_the_readme_vocabulary_exists
    rows = ruby_column
    assert_operator rows.size, :>=, 20, "the table was read"
    names = rows.flat_map { |concept, cell| cell.scan(/`([^`]+)`/).flatten.map { |n| [concept, n] } }
    assert_equal rows.size, rows.count { |_, cell| cell.include?("`") }, "every row names something for Ruby"
    gone = names.filter_map { |concept, n| (m = missing(n)) && "#{concept}: #{m}" }
    assert_empty gone, "names in the README's Ruby column that the gem lacks"
  end

  # The checker itself: a name that does not exist is reported.
  def test_a_missing_name_is_reported
    assert_equal "Switchyard::Worker#no_such", missing("Worker#no_such")
    assert_equal "Switchyard::NoSuch", missing("NoSuch")
    assert_equal "Switchyard::NoSuch#x", missing("NoSuch#x")
    assert_equal "Switchyard::Decision.nope", missing("Decision.nope")
    assert_nil missing("Decision.fan_out")
    assert_nil missing("Context#cancelled?")
  end
end
