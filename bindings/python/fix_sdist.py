#!/usr/bin/env python3
"""Make the sdist of `maturin sdist` buildable: drop the cargo targets whose sources it lacks.

The extension uses the core crate at ``../..`` by path, so ``maturin sdist`` packs that crate
too, with the files its ``package.include`` names. That crate's Cargo.toml is also the
workspace root, and maturin copies it without dropping the ``[[bench]]`` targets whose files
are not packaged (it does so for other crates, as ``cargo package`` does); cargo then refuses
to read the manifest ("can't find `decode` bench at `benches/decode.rs`"). This script
rewrites the archive's Cargo.toml files without the ``[[bench]]``, ``[[test]]``,
``[[example]]`` and ``[[bin]]`` entries whose source file is missing from the archive.

maturin also moves pyproject.toml to the archive's root, where ``readme = "README.md"`` then
names the core crate's README instead of the Python one (a wheel built from the sdist would
carry the wrong description); the script points it back at the file next to the Python
crate's Cargo.toml.

    python3 fix_sdist.py target/wheels/kvsieve-0.1.0.tar.gz   # rewrites it in place

scripts/build-wheel.sh --sdist runs it after ``maturin sdist``. Only the standard library
is needed.
"""

from __future__ import annotations

import io
import posixpath
import re
import sys
import tarfile
import tempfile
from pathlib import Path

TARGET_KINDS = {"bench": "benches", "test": "tests", "example": "examples", "bin": "src/bin"}
# A table header on its own line: `[name]` or `[[name]]` (array of tables).
HEADER = re.compile(r"^\[(\[)?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
KEY = re.compile(r"""^\s*(name|path)\s*=\s*["']([^"']*)["']""")


def strip_missing_targets(manifest: str, crate_dir: str, files: set[str]) -> tuple[str, list[str]]:
    """`manifest` (a Cargo.toml at `crate_dir` in the archive) without the target tables
    whose source is not among `files`; also returns the dropped `kind name` pairs."""
    lines = manifest.splitlines(keepends=True)
    blocks: list[list[str]] = [[]]
    for line in lines:
        if HEADER.match(line):
            blocks.append([])
        blocks[-1].append(line)
    out, dropped = [], []
    for block in blocks:
        m = HEADER.match(block[0]) if block else None
        kind = m.group(2) if m and m.group(1) else None
        if kind in TARGET_KINDS:
            keys = dict(KEY.match(line).groups() for line in block[1:] if KEY.match(line))
            name = keys.get("name", "")
            if "path" in keys:
                candidates = [keys["path"]]
            else:
                base = TARGET_KINDS[kind]
                candidates = [f"{base}/{name}.rs", f"{base}/{name}/main.rs"]
            paths = [posixpath.normpath(posixpath.join(crate_dir, c)) for c in candidates]
            if not any(p in files for p in paths):
                dropped.append(f"{kind} {name}")
                continue
        out.extend(block)
    return "".join(out), dropped


def fix_readme(pyproject: str, root: str, files: dict[str, bytes]) -> tuple[str, list[str]]:
    """`pyproject` (the sdist's, at `root`) with a relative ``readme`` path that names the
    file beside the extension's Cargo.toml (``tool.maturin.manifest-path``), where the
    original pyproject.toml was."""
    manifest = re.search(r"""^manifest-path\s*=\s*["']([^"']+)["']""", pyproject, re.M)
    readme = re.search(r"""^(readme\s*=\s*["'])([^"']+)(["'])""", pyproject, re.M)
    if not manifest or not readme:
        return pyproject, []
    crate_dir = posixpath.dirname(manifest.group(1))
    if not crate_dir:
        return pyproject, []
    moved = posixpath.join(crate_dir, readme.group(2))
    here, there = posixpath.join(root, readme.group(2)), posixpath.join(root, moved)
    if there not in files or files.get(here) == files[there]:
        return pyproject, []
    start, end = readme.span(2)
    return pyproject[:start] + moved + pyproject[end:], [f"readme {readme.group(2)} -> {moved}"]


def fix(path: Path) -> list[str]:
    """Rewrite the sdist at `path` in place; returns what was dropped."""
    with tarfile.open(path, "r:gz") as src:
        members = src.getmembers()
        data = {m.name: src.extractfile(m).read() for m in members if m.isfile()}
    files = set(data)
    report = []
    for name in list(data):
        if posixpath.basename(name) != "Cargo.toml":
            continue
        text = data[name].decode("utf-8")
        new, dropped = strip_missing_targets(text, posixpath.dirname(name), files)
        if dropped:
            data[name] = new.encode("utf-8")
            report += [f"{name}: dropped {d}" for d in dropped]
    for name in list(data):
        root = posixpath.dirname(name)
        if posixpath.basename(name) == "pyproject.toml" and "/" not in root:
            new, changed = fix_readme(data[name].decode("utf-8"), root, data)
            if changed:
                data[name] = new.encode("utf-8")
                report += [f"{name}: {c}" for c in changed]
    if not report:
        return report
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tar.gz", delete=False) as tmp:
        with tarfile.open(fileobj=tmp, mode="w:gz", format=tarfile.PAX_FORMAT) as dst:
            for m in members:
                if m.isfile():
                    m.size = len(data[m.name])
                    dst.addfile(m, io.BytesIO(data[m.name]))
                else:
                    dst.addfile(m)
    Path(tmp.name).replace(path)
    return report


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print(f"usage: {argv[0]} SDIST.tar.gz ...", file=sys.stderr)
        return 2
    for arg in argv[1:]:
        for line in fix(Path(arg)):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
