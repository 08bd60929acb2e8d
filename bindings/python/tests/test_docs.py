"""Docstrings at run time are the stub's: `gen_docs.py` copies every docstring of
`_kvsieve.pyi` into `src/docs.rs`, which the extension's classes, functions, methods and
properties take as their `__doc__`."""

import ast
import importlib.util
import inspect
import pydoc
from pathlib import Path

import pytest

import kvsieve
import kvsieve._kvsieve as ext

PKG = Path(__file__).resolve().parents[1]
INSTALLED_STUB = Path(kvsieve.__file__).parent / "_kvsieve.pyi"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_docs", PKG / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = load_generator()


def stub_docs():
    """Docstrings of the installed stub (the one shipped with the extension under test)."""
    return gen_docs.docstrings(INSTALLED_STUB.read_text(encoding="utf-8"))


def runtime_object(key):
    if key == "@module":
        return ext
    name, _, member = key.partition(".")
    obj = getattr(ext, name)
    if member:
        # The descriptor itself for properties (its __doc__ is the getter's); the
        # function for methods and static methods.
        static = inspect.getattr_static(obj, member)
        obj = static if inspect.isdatadescriptor(static) else getattr(obj, member)
    return obj


def test_docs_rs_is_generated_from_the_stub():
    """src/docs.rs is what gen_docs.py makes of the stub now (run it after editing the stub)."""
    assert gen_docs.STUB == PKG / "py_src" / "kvsieve" / "_kvsieve.pyi"
    expected = gen_docs.render(gen_docs.STUB.read_text(encoding="utf-8"))
    assert gen_docs.OUT.read_text(encoding="utf-8") == expected, "src/docs.rs is out of date: run python3 bindings/python/gen_docs.py"


def test_installed_stub_is_the_source_stub():
    """The wheel under test was built from this tree (rebuild it after editing the stub)."""
    assert INSTALLED_STUB.read_text(encoding="utf-8") == gen_docs.STUB.read_text(encoding="utf-8")


@pytest.mark.parametrize("key", sorted(stub_docs()))
def test_runtime_doc_is_the_stub_doc(key):
    assert runtime_object(key).__doc__ == stub_docs()[key]


def test_every_public_item_has_a_docstring():
    """Every class, function, method and property of the stub has a docstring (dunder
    methods and ErrorCode's members aside), so nothing at run time lacks one."""
    tree = ast.parse(INSTALLED_STUB.read_text(encoding="utf-8"))
    missing = []
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            if not ast.get_docstring(node):
                missing.append(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("__") and not ast.get_docstring(item):
                        missing.append(f"{node.name}.{item.name}")
    assert missing == []
    # ... and every public callable or property of the module has a stub docstring.
    docs = stub_docs()
    undocumented = []
    for name in dir(ext):
        if name.startswith("_"):
            continue
        obj = getattr(ext, name)
        if not (inspect.isclass(obj) or callable(obj)):
            continue
        if name not in docs:
            undocumented.append(name)
        if inspect.isclass(obj) and not issubclass(obj, (BaseException, int)):
            for member, value in vars(obj).items():
                if member.startswith("_"):
                    continue
                if (callable(value) or inspect.isdatadescriptor(value) or isinstance(value, staticmethod)) and f"{name}.{member}" not in docs:
                    undocumented.append(f"{name}.{member}")
    assert undocumented == []


def test_help_shows_the_full_documentation():
    text = pydoc.render_doc(kvsieve.KvCache.decode, renderer=pydoc.plaintext)
    assert "Args:" in text and "position_mode" in text and "Returns:" in text
    assert kvsieve.KvCache.decode.__text_signature__.startswith("($self, layer, seqs, q, *")
    assert "Args:" in kvsieve.paged_decode.__doc__
    assert "num_kv_heads" in kvsieve.KvCache.__doc__
    assert kvsieve.CacheConfig.num_layers.__doc__ == "Number of layers."
    assert kvsieve.ShapeError.__doc__ == "An array has the wrong shape or strides (also a ``ValueError``)."
