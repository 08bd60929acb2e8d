#!/usr/bin/env bash
# The main job. Builds kvsieve, runs the "store a prompt, decode a token" examples in
# Rust, C and Python, then the dense decode benchmark (a quick shape by default).
#   --full    the decode benchmark at the 32K-token shape of scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=4096
[ "${1:-}" = "--full" ] && tokens=32768

bash scripts/setup.sh
echo "== building (release)"
cargo build --release -q --lib --examples --benches
bash scripts/build-wheel.sh --release

echo; echo "== Rust: examples/01_store_and_decode.rs"
cargo run --release -q --example 01_store_and_decode

echo; echo "== C: examples/c/01_store_and_decode.c"
mkdir -p target/demo
cc -O2 -std=c99 -Iinclude examples/c/01_store_and_decode.c -Ltarget/release -lkvsieve -Wl,-rpath,"$PWD/target/release" -lm -o target/demo/01_store_and_decode
target/demo/01_store_and_decode

echo; echo "== Python: examples/python/01_store_and_decode.py"
.venv/bin/python examples/python/01_store_and_decode.py

echo; echo "== dense decode benchmark ($tokens tokens)"
cargo bench -q --bench report -- --tokens "$tokens"
