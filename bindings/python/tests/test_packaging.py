"""fix_sdist.py: the sdist's Cargo.toml files lose the targets whose sources it lacks, and
nothing else."""

import importlib.util
import io
import tarfile
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, PKG / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fix_sdist = load("fix_sdist")

MANIFEST = """\
[package]
name = "core"

[dev-dependencies]
criterion = "0.8"

[[bench]]
name = "decode"
harness = false

[target.'cfg(target_os = "linux")'.dependencies]
libc = "0.2"

[[bench]]
name = "kept"
harness = false

[[example]]
name = "demo"
path = "examples/demo.rs"

[[test]]
name = "gone" # a comment
required-features = ["x"]

[profile.release]
debug = 1
"""


def test_strip_missing_targets():
    files = {"pkg-1.0/Cargo.toml", "pkg-1.0/benches/kept/main.rs", "pkg-1.0/examples/demo.rs", "pkg-1.0/src/lib.rs"}
    text, dropped = fix_sdist.strip_missing_targets(MANIFEST, "pkg-1.0", files)
    assert dropped == ["bench decode", "test gone"]
    assert 'name = "decode"' not in text and 'name = "gone"' not in text
    for kept in ('name = "kept"', 'path = "examples/demo.rs"', "libc = \"0.2\"", "criterion", "[profile.release]\ndebug = 1"):
        assert kept in text
    # Nothing to drop: unchanged.
    everything = files | {"pkg-1.0/benches/decode.rs", "pkg-1.0/tests/gone.rs"}
    assert fix_sdist.strip_missing_targets(MANIFEST, "pkg-1.0", everything) == (MANIFEST, [])


def test_fix_rewrites_the_archive(tmp_path):
    path = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("pkg-1.0/Cargo.toml", MANIFEST), ("pkg-1.0/benches/kept.rs", "fn main() {}"), ("pkg-1.0/src/lib.rs", "")]:
            info = tarfile.TarInfo(name)
            info.size = len(data.encode())
            tar.addfile(info, io.BytesIO(data.encode()))
    report = fix_sdist.fix(path)
    assert report == ["pkg-1.0/Cargo.toml: dropped bench decode", "pkg-1.0/Cargo.toml: dropped example demo", "pkg-1.0/Cargo.toml: dropped test gone"]
    with tarfile.open(path) as tar:
        assert sorted(tar.getnames()) == ["pkg-1.0/Cargo.toml", "pkg-1.0/benches/kept.rs", "pkg-1.0/src/lib.rs"]
        text = tar.extractfile("pkg-1.0/Cargo.toml").read().decode()
    assert 'name = "kept"' in text and "[[example]]" not in text
    assert fix_sdist.fix(path) == []


def test_readme_points_at_the_python_readme():
    pyproject = '[project]\nname = "x"\nreadme = "README.md"\n\n[tool.maturin]\nmanifest-path = "bindings/python/Cargo.toml"\n'
    files = {"x-1/README.md": b"# core crate", "x-1/bindings/python/README.md": b"# python"}
    text, changed = fix_sdist.fix_readme(pyproject, "x-1", files)
    assert 'readme = "bindings/python/README.md"' in text and changed == ["readme README.md -> bindings/python/README.md"]
    # The same file at the root, or no manifest-path: nothing to do.
    same = {"x-1/README.md": b"# python", "x-1/bindings/python/README.md": b"# python"}
    assert fix_sdist.fix_readme(pyproject, "x-1", same) == (pyproject, [])
    plain = '[project]\nreadme = "README.md"\n'
    assert fix_sdist.fix_readme(plain, "x-1", files) == (plain, [])
