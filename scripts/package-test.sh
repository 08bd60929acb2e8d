#!/usr/bin/env bash
# The Rust crate and the Python package, used as a project outside this repository would:
#   (a) Rust: a new crate in a temporary directory does `cargo add kvsieve --path <repo>` and
#       runs examples/01_store_and_decode.rs as its main;
#   (b) crates.io: `cargo package -p kvsieve` packs the core crate (library, CUDA kernels,
#       build script, README, one example) and builds the packed copy;
#   (c) Python: `pip install ./bindings/python` into a fresh venv outside the repository,
#       then an import and a decode.
# Any failure fails the script. The C library's install is tested by scripts/install-test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
work="$(mktemp -d -t kvsieve-package.XXXXXX)"
trap 'rm -rf "$work"' EXIT
fail() {
  echo "package-test: FAILED: $*" >&2
  exit 1
}
# Builds share the repository's target folder, so nothing is compiled twice.
export CARGO_TARGET_DIR="$repo/target/package-test"

echo "== (a) Rust: cargo add kvsieve --path $repo"
(cd "$work" && cargo new -q --bin engine)
(cd "$work/engine" && cargo add -q kvsieve --path "$repo")
cp examples/01_store_and_decode.rs "$work/engine/src/main.rs"
out="$(cd "$work/engine" && cargo run -q --release)" || fail "(a) the crate does not build or run"
echo "$out" | sed 's/^/   /'
echo "$out" | grep -q "^sequence length 101" || fail "(a) unexpected output"

echo "== (b) cargo package -p kvsieve"
cargo package -q -p kvsieve --allow-dirty 2>&1 | grep -v '^warning: ignoring \(test\|benchmark\)' || true
[ -f "$CARGO_TARGET_DIR/package/kvsieve-$(cargo pkgid -p kvsieve | sed 's/.*[#@]//').crate" ] || fail "(b) no .crate file"

echo "== (c) Python: pip install ./bindings/python into a fresh venv"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$repo/bindings/python" || fail "(c) pip install failed"
(cd "$work" && "$work/venv/bin/python" - <<'PY') || fail "(c) the installed package does not work"
import numpy as np, kvsieve
cache = kvsieve.KvCache(1, 2, 64, 16, 8, dtype="f16")
s = cache.create_sequence()
cache.append(s, 20)
rng = np.random.default_rng(0)
k = rng.standard_normal((20, 2, 64))            # float64, converted
cache.write(s, 0, 0, k, k)
out, lse = cache.decode(0, [s], rng.standard_normal((1, 8, 64)).astype(np.float32))
assert out.shape == (1, 8, 64) and np.isfinite(out).all()
print(f"   kvsieve {kvsieve.__version__} from {kvsieve.__file__}: decode ok")
PY
echo "package-test: ok"
