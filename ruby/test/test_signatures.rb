# frozen_string_literal: true

require_relative "helper"
require "rbs"

# The RBS signatures shipped in the gem parse, and every method they declare
# exists on the loaded classes (and every public method of the main classes
# is declared), so the signatures cannot drift from the code.
class TestSignatures < Minitest::Test
  SIG = File.join(Gem.loaded_specs["switchyard"].full_gem_path, "sig", "switchyard.rbs")

  def declarations
    RBS::Parser.parse_signature(File.read(SIG))
  end

  def members_of(decl, prefix = "")
    out = {}
    decl.members.each do |m|
      case m
      when RBS::AST::Declarations::Class, RBS::AST::Declarations::Module
        out.merge!(members_of(m, "#{prefix}#{m.name}::"))
        out["#{prefix}#{m.name}"] ||= []
        m.members.each do |mm|
          case mm
          when RBS::AST::Members::MethodDefinition
            out["#{prefix}#{m.name}"] << [mm.name, mm.singleton? ? :singleton : :instance]
          when RBS::AST::Members::AttrReader, RBS::AST::Members::AttrAccessor
            out["#{prefix}#{m.name}"] << [mm.name, :instance]
          end
        end
      end
    end
    out
  end

  def test_signatures_parse_and_match_the_code
    assert File.exist?(SIG), "the gem ships #{SIG}"
    mod = declarations.find { |d| d.is_a?(RBS::AST::Declarations::Module) && d.name.to_s == "Switchyard" }
    refute_nil mod
    classes = members_of(mod, "Switchyard::")
    %w[Switchyard::Worker Switchyard::Client Switchyard::Context Switchyard::Decision].each do |c|
      assert classes.key?(c), "#{c} is declared"
    end
    classes.each do |name, methods|
      klass = Object.const_get(name)
      methods.each do |meth, kind|
        if kind == :singleton
          assert klass.respond_to?(meth), "#{name}.#{meth} is declared but does not exist"
        else
          assert klass.method_defined?(meth) || klass.private_method_defined?(meth), "#{name}##{meth} is declared but does not exist"
        end
      end
    end
    { "Switchyard::Worker" => Switchyard::Worker, "Switchyard::Client" => Switchyard::Client,
      "Switchyard::Context" => Switchyard::Context }.each do |name, klass|
      declared = classes.fetch(name).map(&:first)
      public = klass.public_instance_methods(false).reject { |m| m.to_s.start_with?("_") || %i[to_s inspect].include?(m) }
      missing = public - declared
      assert_empty missing, "#{name}: public methods without a signature"
    end
    %w[default_store step].each { |m| assert Switchyard.respond_to?(m) }
  end

  # `rbs validate`: every type the signatures name exists (core types and
  # the gem's own aliases), with the signatures the gem ships.
  def test_rbs_validate_accepts_the_shipped_signatures
    require "rbs/cli"
    require "stringio"
    out = StringIO.new
    err = StringIO.new
    RBS::CLI.new(stdout: out, stderr: err).run(["-I", File.dirname(SIG), "validate"])
    assert_match(/Validating class\/module definition: `::Switchyard::Context`/, out.string)
    assert_empty err.string
  end
end
