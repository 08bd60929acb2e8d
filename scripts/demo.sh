#!/usr/bin/env bash
# The main job. Builds kvsieve, runs the "store a prompt, decode a token" examples in
# Rust, C and Python, then the dense decode benchmark (a quick shape by default), then
# SmolLM2-135M-Instruct on kvsieve (examples/llama): the next-token check and a short
# evaluation of the selection policies (2K-token context, budgets 1/4 and 1/8).
#   --full    the decode benchmark at the 32K-token shape of scripts/bench.sh, and the
#             full policy sweep (contexts 2K/4K/8K, budgets 1/2..1/16; hours on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=4096
llama_args=()
bench_args=(--no-prefill)
if [ "${1:-}" = "--full" ]; then
  tokens=32768
  llama_args=(--full)
  bench_args=()
fi

bash scripts/setup.sh
echo "== building (release)"
cargo build --release -q --lib --examples --benches
bash scripts/build-wheel.sh --release

echo; echo "== Rust: examples/01_store_and_decode.rs"
cargo run --release -q --example 01_store_and_decode

echo; echo "== C: examples/c/01_store_and_decode.c, against the library installed into target/demo/prefix"
mkdir -p target/demo
bash scripts/install.sh --prefix target/demo/prefix
prefix="$PWD/target/demo/prefix"
cc -O2 -std=c99 examples/c/01_store_and_decode.c -I"$prefix/include" -L"$prefix/lib" -lkvsieve -Wl,-rpath,"$prefix/lib" -lm \
  -o target/demo/01_store_and_decode
target/demo/01_store_and_decode

echo; echo "== Python: examples/python/01_store_and_decode.py"
.venv/bin/python examples/python/01_store_and_decode.py

echo; echo "== dense decode benchmark ($tokens tokens)"
cargo bench -q --bench report -- --tokens "$tokens" "${bench_args[@]}"

echo; echo "== SmolLM2-135M-Instruct on kvsieve (examples/llama)"
model=$(bash scripts/fetch-model.sh)
bash examples/llama/scripts/fetch-text.sh >/dev/null
cargo build --release -q -p kvsieve-llama
echo "next token after \"The capital of France is\":"
target/release/kvsieve-llama --model "$model" logits --prompt "The capital of France is" --top 5
echo; echo "== policy evaluation (passkey, needle in the KJV, perplexity; KV read and attention time per decode step)"
target/release/kvsieve-llama --model "$model" sweep --out target/llama-eval "${llama_args[@]}"
