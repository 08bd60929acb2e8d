#!/usr/bin/env python3
"""Fails when a module of the core crate uses one above it, or when two modules of one layer
use each other.

The layers, bottom to top (README, "Layout"):
    base (error, alloc, dtype, tensor, config) -> cpu -> kv -> attention -> select -> runtime
    -> backend
A file may use its own layer and the ones below. The C API is a crate of its own above the
core (crates/kvsieve-c, using only the core's public items), so it is not checked here.
Within a layer, the modules one level down
(`select::pages`, `select::cluster`, ...) must not form a cycle; `ALLOWED_PAIRS` lists the
pairs that may share types both ways (a file and its own parser).

Uses are read from code, not comments: every `crate::a::b` path, `use super::b` inside a
layer's folder, and names the layer's `mod.rs` re-exports (`crate::select::Selection` is
`select::selection`). Test code is not the library: `#[cfg(test)] mod name { ... }` blocks
and files declared by `#[cfg(test)] mod name;` may use any layer (a storage test may check
its state through a decode). Run from anywhere: `python3 scripts/check-layers.py`.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

LAYERS = [
    {"error", "alloc", "dtype", "tensor", "config"},
    {"cpu"},
    {"kv"},
    {"attention"},
    {"select"},
    {"runtime"},
    {"backend"},
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
ALLOWED_PAIRS = {frozenset({"select::policy", "select::policy_text"})}


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return "\n".join(line.split("//", 1)[0] for line in text.split("\n"))


def strip_test_blocks(code):
    """The code without its inline `#[cfg(test)] mod name { ... }` blocks."""
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", code):
        if m.start() < pos:
            continue
        depth, i = 1, m.end()
        while i < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        out.append(code[pos : m.start()])
        pos = i
    out.append(code[pos:])
    return "".join(out)


def test_files(files):
    """Files declared as test-only modules (`#[cfg(test)] mod name;` in their parent)."""
    out = set()
    for f in files:
        code = strip_comments(open(f, encoding="utf-8").read())
        base = os.path.dirname(f) if os.path.basename(f) in ("mod.rs", "lib.rs") else f[: -len(".rs")]
        for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+(\w+)\s*;", code):
            for cand in (os.path.join(base, m.group(1) + ".rs"), os.path.join(base, m.group(1), "mod.rs")):
                out.add(os.path.normpath(cand))
    return out


def module_of(path):
    """('select', 'select::pages') for src/select/pages.rs; ('select', 'select') for mod.rs."""
    rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
    parts = rel[: -len(".rs")].split("/")
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        return None, None
    top = parts[0]
    sub = "::".join(parts[:2]) if len(parts) > 1 else top
    return top, sub


def reexports(top):
    """Names that `src/<top>/mod.rs` re-exports, mapped to the submodule defining them."""
    path = os.path.join(ROOT, top, "mod.rs")
    names = {}
    if not os.path.exists(path):
        return names
    code = strip_comments(open(path, encoding="utf-8").read())
    for m in re.finditer(r"pub(?:\([a-z]+\))?\s+use\s+(\w+)::(\{[^}]*\}|\w+)", code):
        sub, items = m.group(1), m.group(2)
        if sub in ("crate", "super", "self"):
            continue
        for name in re.findall(r"\w+", items):
            if name != "self":
                names[name] = f"{top}::{sub}"
    return names


def main():
    files = []
    for d, _, fs in os.walk(ROOT):
        files += [os.path.join(d, f) for f in fs if f.endswith(".rs")]
    tops = {module_of(f)[0] for f in files} - {None}
    unknown = sorted(t for t in tops if t not in RANK)
    problems = [f"src/{t}: a top-level module in no layer (add it to LAYERS)" for t in unknown]
    exports = {t: reexports(t) for t in tops}
    # Names the crate root re-exports (`crate::KvCache`), by the layer defining them.
    root = {}
    lib = strip_comments(open(os.path.join(ROOT, "lib.rs"), encoding="utf-8").read())
    for m in re.finditer(r"pub\s+use\s+(\w+)::(\{[^}]*\}|\w+)", lib):
        for name in re.findall(r"\w+", m.group(2)):
            if m.group(1) in RANK:
                root[name] = m.group(1)
    edges = {}
    tests = test_files(files)
    for f in sorted(files):
        top, sub = module_of(f)
        if top is None or top not in RANK or os.path.normpath(f) in tests:
            continue
        code = strip_test_blocks(strip_comments(open(f, encoding="utf-8").read()))
        rel = os.path.relpath(f, os.path.join(ROOT, "..")).replace(os.sep, "/")
        uses = set()
        for m in re.finditer(r"\bcrate::(\w+)(?:::(\w+))?", code):
            t, s = m.group(1), m.group(2)
            if t in root:
                t, s = root[t], None
            if t not in RANK:
                continue
            if RANK[t] > RANK[top]:
                line = code[: m.start()].count("\n") + 1
                problems.append(f"{rel}:{line}: `{m.group(0)}`: layer {top} uses {t}, which is above it")
            if t == top and s:
                uses.add(exports[t].get(s, f"{t}::{s}"))
        if "/" in os.path.relpath(f, ROOT):
            for m in re.finditer(r"\bsuper::(\w+)", code):
                depth = os.path.relpath(f, ROOT).count("/")
                if depth == 1 or (depth == 2 and os.path.basename(f) == "mod.rs"):
                    uses.add(exports[top].get(m.group(1), f"{top}::{m.group(1)}"))
        for u in uses:
            if u != sub and u.count("::") == 1 and sub.count("::") == 1:
                edges.setdefault(sub, set()).add(u)
    for a, targets in edges.items():
        for b in targets:
            if a < b and a in edges.get(b, set()) and frozenset({a, b}) not in ALLOWED_PAIRS:
                problems.append(f"{a} and {b} use each other")
    if problems:
        print("layer check failed:")
        print("\n".join("  " + p for p in problems))
        return 1
    print(f"layer check: {len(files)} files, no upward use, no cycle between modules of a layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
