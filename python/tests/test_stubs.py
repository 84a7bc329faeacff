"""The .pyi stub must match the runtime module exactly: the same classes,
functions, methods and properties, and the same parameter names and
defaults as the compiled signatures."""

import ast
import inspect
import os
import sys

import switchyard
from switchyard import _native

STUB = os.path.join(os.path.dirname(switchyard.__file__), "_native.pyi")


def _stub_tree():
    with open(STUB) as f:
        return ast.parse(f.read())


def _stub_params(fn):
    """(name, has_default) for each parameter of a stub function, minus self."""
    args = fn.args
    pos = args.posonlyargs + args.args
    defaults = [False] * (len(pos) - len(args.defaults)) + [True] * len(args.defaults)
    out = [(a.arg, d) for a, d in zip(pos, defaults)]
    out += [(a.arg, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return [p for p in out if p[0] != "self"]


def _stub_default(node):
    return ast.literal_eval(node)


def _signature(obj):
    try:
        return inspect.signature(obj)
    except ValueError:
        # abi3 extension classes expose their constructor signature only on
        # Python >= 3.10; methods and functions have one everywhere.
        if isinstance(obj, type) and sys.version_info < (3, 10):
            return None
        raise


def _runtime_params(obj):
    sig = _signature(obj)
    if sig is None:
        return None
    return [(p.name, p.default is not inspect.Parameter.empty) for p in sig.parameters.values() if p.name != "self"]


def _is_property(fn):
    return any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)


def test_classes_and_members_match():
    tree = _stub_tree()
    declared_classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    actual_classes = {n for n in dir(_native) if n[0].isupper()}
    assert declared_classes == actual_classes
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(_native, node.name)
        fns = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        declared = {n for n in fns if n != "__init__"}
        actual = {n for n in dir(cls) if not n.startswith("_")}
        assert declared == actual, f"{node.name}: stub and runtime differ on {sorted(declared ^ actual)}"
        for name, fn in fns.items():
            runtime = getattr(cls, "__new__" if name == "__init__" else name)
            if _is_property(fn):
                assert type(runtime).__name__ in ("property", "getset_descriptor", "member_descriptor"), (node.name, name)
                continue
            if name == "__init__" and "__init__" not in fns:
                continue
            target = cls if name == "__init__" else runtime
            runtime_params = _runtime_params(target)
            if runtime_params is not None:
                assert _stub_params(fn) == runtime_params, f"{node.name}.{name}"


def test_functions_and_defaults_match():
    tree = _stub_tree()
    declared = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    actual = {n for n in dir(_native) if not n.startswith("_") and callable(getattr(_native, n)) and n[0].islower()}
    assert set(declared) == actual
    for name, fn in declared.items():
        assert _stub_params(fn) == _runtime_params(getattr(_native, name)), name
    # Default values, not only their presence, for every method that has them.
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(_native, node.name)
        for fn in node.body:
            if not isinstance(fn, ast.FunctionDef) or _is_property(fn):
                continue
            target = cls if fn.name == "__init__" else getattr(cls, fn.name)
            sig = _signature(target)
            if sig is None:
                continue
            pos = fn.args.posonlyargs + fn.args.args
            for arg, default in zip(pos[len(pos) - len(fn.args.defaults):], fn.args.defaults):
                assert sig.parameters[arg.arg].default == _stub_default(default), f"{node.name}.{fn.name}({arg.arg})"


def test_package_is_typed():
    assert os.path.exists(os.path.join(os.path.dirname(switchyard.__file__), "py.typed"))
    assert hasattr(switchyard, "__version__")
    for name in switchyard.__all__:
        assert hasattr(switchyard, name), name
