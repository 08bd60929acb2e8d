"""The package surface: version, isa, constants, and the .pyi stubs in step with the module."""

import ast
import inspect
import os
import sys
import subprocess
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
    assert kvsieve.isa() in ("avx512f+avx2+fma+f16c", "avx2+fma+f16c", "portable")
    # KVSIEVE_ISA lowers the level in a new process and never raises it.
    def isa_with(level):
        env = {k: v for k, v in os.environ.items() if k != "KVSIEVE_ISA"}
        if level is not None:
            env["KVSIEVE_ISA"] = level
        cmd = [sys.executable, "-c", "import kvsieve; print(kvsieve.isa())"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()

    best = isa_with(None)
    assert isa_with("portable") == "portable"
    assert isa_with("avx2") == ("portable" if best == "portable" else "avx2+fma+f16c")
    assert isa_with("avx512") == best
    assert kvsieve.MAX_HEAD_DIM == 512 and kvsieve.MAX_PAGE_SIZE == 1024
    assert os.path.exists(os.path.join(STUB_DIR, "py.typed"))


def test_init_reexports_everything():
    public = {n for n in dir(ext) if not n.startswith("_")} | {"__version__"}
    assert set(kvsieve.__all__) == public
    init_stub = load_stub("__init__.pyi")
    imported = {a.asname for node in init_stub.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert imported == public
    stub_all = [node for node in init_stub.body if isinstance(node, ast.Assign) and node.targets[0].id == "__all__"]
    assert len(stub_all) == 1 and {e.value for e in stub_all[0].value.elts} == public


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
                decorators = {d.id for d in item.decorator_list if isinstance(d, ast.Name)}
                where = f"{node.name}.{item.name}"
                if item.name == "__init__":
                    assert stub_params(item) == runtime_params(cls), node.name
                elif "property" in decorators:
                    # A Python property or a getter of the extension type, not a method.
                    assert inspect.isdatadescriptor(inspect.getattr_static(cls, item.name)), where
                else:
                    is_static = isinstance(inspect.getattr_static(cls, item.name), staticmethod)
                    assert is_static == ("staticmethod" in decorators), f"{where}: staticmethod in one of stub and module only"
                    assert stub_params(item) == runtime_params(getattr(cls, item.name)), where
            # Every public method of the class is in the stub.
            stub_members = {i.name for i in node.body if isinstance(i, ast.FunctionDef)}
            stub_members |= {t.target.id for t in node.body if isinstance(t, ast.AnnAssign)}
            stub_members |= {t.targets[0].id for t in node.body if isinstance(t, ast.Assign)}
            runtime_members = {n for n in vars(cls) if not n.startswith("_")}
            # Getters of the extension type are properties in the stub, and the other way round.
            stub_properties = {
                i.name for i in node.body if isinstance(i, ast.FunctionDef) and any(isinstance(d, ast.Name) and d.id == "property" for d in i.decorator_list)
            }
            runtime_getters = {n for n in runtime_members if inspect.isdatadescriptor(inspect.getattr_static(cls, n))}
            if not issubclass(cls, BaseException):
                assert runtime_getters == stub_properties, f"{node.name}: properties differ"
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


def test_attention_calls_take_position_mode():
    """Every decode / prefill takes position_mode and max_distance (keyword-only, defaults
    "original" and None), except the policy-driven ones (with a policy or with clusters),
    whose policy sets them."""
    calls = [getattr(ext, n) for n in dir(ext) if n.startswith(("paged_decode", "paged_prefill"))]
    calls += [getattr(ext.KvCache, n) for n in dir(ext.KvCache) if n.startswith(("decode", "prefill"))]
    assert len(calls) == 11
    for fn in calls:
        params = dict((name, (kind, default)) for name, kind, default in runtime_params(fn))
        if fn.__name__.endswith(("_with_policy", "_with_clusters")):
            assert "position_mode" not in params and "max_distance" not in params, fn.__name__
        else:
            assert params["position_mode"] == ("keyword", "original"), fn.__name__
            assert params["max_distance"] == ("keyword", None), fn.__name__


def test_parse_error_offset_in_stub():
    stub = load_stub("_kvsieve.pyi")
    cls = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "ParseError")
    assert any(isinstance(t, ast.AnnAssign) and t.target.id == "offset" for t in cls.body)
