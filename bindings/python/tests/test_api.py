"""The package surface: version, isa, constants, and the .pyi stubs in step with the module."""

import ast
import inspect
import os
import re

import kvsieve
import kvsieve._kvsieve as ext

STUB_DIR = os.path.dirname(kvsieve.__file__)


def load_stub(name):
    with open(os.path.join(STUB_DIR, name)) as f:
        return ast.parse(f.read())


def stub_params(fn):
    """(name, kind, default) of a stub function's parameters, `self` left out."""
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
    for arg, d in zip(positional, defaults):
        if arg.arg != "self":
            out.append((arg.arg, "positional", None if d is None else ast.literal_eval(d)))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "keyword", None if d is None else ast.literal_eval(d)))
    return out


def runtime_params(obj):
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.name == "self":
            continue
        kind = "keyword" if p.kind is inspect.Parameter.KEYWORD_ONLY else "positional"
        default = None if p.default is inspect.Parameter.empty else p.default
        out.append((p.name, kind, default))
    return out


def test_version_isa_constants():
    assert re.fullmatch(r"\d+\.\d+\.\d+", kvsieve.__version__)
    assert kvsieve.isa() in ("avx2+fma+f16c", "portable")
    assert kvsieve.MAX_HEAD_DIM == 512 and kvsieve.MAX_PAGE_SIZE == 1024
    assert os.path.exists(os.path.join(STUB_DIR, "py.typed"))


def test_init_reexports_everything():
    public = {n for n in dir(ext) if not n.startswith("_")} | {"__version__"}
    assert set(kvsieve.__all__) == public
    init_stub = load_stub("__init__.pyi")
    imported = {a.asname for node in init_stub.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert imported == public


def test_stub_names_and_signatures_match_the_module():
    stub = load_stub("_kvsieve.pyi")
    declared = set()
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            declared.add(node.name)
            assert stub_params(node) == runtime_params(getattr(ext, node.name)), node.name
        elif isinstance(node, ast.ClassDef):
            declared.add(node.name)
            cls = getattr(ext, node.name)
            for item in node.body:
                if not isinstance(item, ast.FunctionDef) or item.name == "__eq__":
                    continue
                is_property = any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list)
                if item.name == "__init__":
                    assert stub_params(item) == runtime_params(cls), node.name
                elif is_property:
                    assert isinstance(inspect.getattr_static(cls, item.name), property) or hasattr(cls, item.name)
                else:
                    assert stub_params(item) == runtime_params(getattr(cls, item.name)), f"{node.name}.{item.name}"
            # Every public method of the class is in the stub.
            stub_members = {i.name for i in node.body if isinstance(i, ast.FunctionDef)}
            stub_members |= {t.target.id for t in node.body if isinstance(t, ast.AnnAssign)}
            stub_members |= {t.targets[0].id for t in node.body if isinstance(t, ast.Assign)}
            runtime_members = {n for n in vars(cls) if not n.startswith("_")}
            if issubclass(cls, BaseException):
                runtime_members -= {"code", "code_name"}
            elif issubclass(cls, int):
                runtime_members = {m.name for m in cls}
            assert runtime_members <= stub_members, f"{node.name}: {runtime_members - stub_members} missing from the stub"
        elif isinstance(node, ast.AnnAssign):
            declared.add(node.target.id)
    public = {n for n in dir(ext) if not n.startswith("_")} | {"__version__"}
    assert public <= declared, f"missing from _kvsieve.pyi: {public - declared}"
    assert declared - {"FloatArray", "IntArray"} <= public, f"in the stub only: {declared - public}"


def test_error_code_stub_values():
    stub = load_stub("_kvsieve.pyi")
    enum_node = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "ErrorCode")
    values = {t.targets[0].id: ast.literal_eval(t.value) for t in enum_node.body if isinstance(t, ast.Assign)}
    assert values == {m.name: int(m) for m in kvsieve.ErrorCode}
