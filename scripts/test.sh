#!/usr/bin/env bash
# Every test: Rust (unit, property, integration), the C library (crates/kvsieve-c: C programs
# against the headers and the built library, header/export check), the examples, pytest on
# the installed wheel, and llama.cpp patched to compute its attention through kvsieve.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

bash scripts/setup.sh

# ---- Gates: one format, no lint, docs without broken links, layers that point one way.
echo "== gates: cargo fmt --check, clippy -D warnings, rustdoc -D warnings, layer check"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p kvsieve
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p kvsieve-c
python3 scripts/check-layers.py

echo "== cargo build (library, examples, benches)"
cargo build --lib --examples --benches
echo "== cargo test"
cargo test --no-fail-fast
cargo test --doc
echo "== cargo test -p kvsieve-c (the C library: C programs under valgrind, headers, exports)"
cargo test -p kvsieve-c --no-fail-fast
echo "== install test: scripts/install.sh, then the C example built with pkg-config (shared, static) and CMake"
bash scripts/install-test.sh
echo "== package test: the Rust crate through cargo add and cargo package, pip install of the Python package"
bash scripts/package-test.sh
# The CPU kernels pick the best instruction set at run time (AVX-512, AVX2, portable); the
# suites that reach them run again with each lower level this CPU can replace the best with.
for isa in avx2 portable; do
    echo "== cargo test, CPU kernels limited to $isa (KVSIEVE_ISA=$isa)"
    KVSIEVE_ISA=$isa cargo test --no-fail-fast --lib --test attention --test sparse --test gemfilter \
        --test cluster --test select --test policy_clusters --test spans
done

echo "== fuzzing: kept inputs replayed, then a short run of every driver (scripts/fuzz.sh)"
cargo test --release -p kvsieve-fuzz
bash scripts/fuzz.sh --seconds 60

echo "== examples"
cargo run -q --example 01_store_and_decode

echo "== python wheel"
bash scripts/build-wheel.sh --release
.venv/bin/python examples/python/01_store_and_decode.py
echo "== pytest"
.venv/bin/python -m pytest -q bindings/python/tests

echo "== examples/llama: SmolLM2-135M-Instruct on kvsieve (release; fetches the model once)"
bash scripts/fetch-model.sh >/dev/null
bash examples/llama/scripts/fetch-text.sh >/dev/null
cargo test --release -p kvsieve-llama --no-fail-fast

echo "== llama.cpp with its attention through kvsieve: build (integrations/llama.cpp/build.sh), stock against kvsieve dense"
bash integrations/llama.cpp/test.sh

# ---- CUDA backend: every kernel compiles (spills in hot kernels fail the build); the GPU
# ---- tests run where a GPU is present and print "skipped: <reason>" elsewhere.
echo "== CUDA: pinned nvcc, cargo build --features cuda, tests/cuda_* (core and C library)"
NVCC="$(bash scripts/cuda-toolchain.sh)"
export NVCC
cargo build --features cuda
cargo build -p kvsieve-c --features cuda
cargo clippy -p kvsieve -p kvsieve-python --all-targets --features cuda -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p kvsieve --features cuda
cargo clippy -p kvsieve-c --all-targets --features cuda -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p kvsieve-c --features cuda
cargo test --features cuda --test 'cuda_*' -- --test-threads=1
cargo test -p kvsieve-c --features cuda --test 'cuda_*' -- --test-threads=1
# ---- The same tests again with every kernel run on the CPU emulator of the CUDA execution
# ---- model (scripts/cuda-emu.sh): the kernels' arithmetic, indexing and synchronisation
# ---- checked against the CPU backend without a GPU.
echo "== CUDA kernels on the CPU emulator: tests/cuda_* (core and C library)"
KVSIEVE_EMU_REQUIRE_ALL=1 bash scripts/cuda-emu.sh test -- --test-threads=2
