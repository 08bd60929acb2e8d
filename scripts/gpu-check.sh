#!/usr/bin/env bash
# Builds, here, everything a GPU machine needs to check the CUDA backend, into one
# git-ignored folder, target/gpu-check/:
#   bin/test-cuda_*      release builds of the CUDA integration tests (tests/cuda_*.rs, and
#                        crates/kvsieve-c/tests/cuda_ffi.rs for the kvsieve_cuda_* C entry points)
#   bin/bench-gpu_*      release builds of the GPU benches (benches/gpu_*.rs)
#   gpu_sdpa.py          torch's scaled_dot_product_attention on the data gpu_report dumps
#   py/                  a wheel built with the CUDA backend and the Python CUDA tests
#   ptxas-report.txt     registers / spills / shared memory of every kernel
#   run.sh               THE one command to run on the GPU machine (copy the folder there)
# run.sh runs the GPU tests, then prints the figures: gpu_decode_bw_fraction_* (K/V bytes
# per second over the device-to-device copy bandwidth of the same run),
# gpu_sparse_speedup_128k, every other bench/gpu_* (k-means), and dense decode against
# torch SDPA. Budget: under 8 minutes.
#
# usage: scripts/gpu-check.sh          build the folder
#        scripts/gpu-check.sh --run    build it and run target/gpu-check/run.sh here
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

NVCC="${NVCC:-$(bash scripts/cuda-toolchain.sh)}"
export NVCC
out=target/gpu-check
rm -rf "$out"
mkdir -p "$out/bin"

collect() { # $1 = kind (test|bench); stdin = cargo's JSON messages
  python3 -c '
import json, shutil, sys
kind, dest = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kind in m["target"]["kind"]:
        name = m["target"]["name"]
        shutil.copy2(m["executable"], f"{dest}/{kind}-{name}")
        print(f"  {kind}-{name}")
' "$1" "$out/bin"
}

echo "== building the CUDA tests and GPU benches (release, --features cuda)"
cargo test --release --features cuda --no-run --message-format=json --test 'cuda_*' | collect test
cargo test --release -p kvsieve-c --features cuda --no-run --message-format=json --test 'cuda_*' | collect test
cargo bench --features cuda --no-run --message-format=json --bench 'gpu_*' | collect bench
# Without debug info: the folder travels to the GPU machine whole (the device tool carries
# at most 64 MiB).
if command -v strip >/dev/null; then
  strip --strip-debug "$out"/bin/*
fi
cp scripts/gpu_sdpa.py "$out/"
echo "== building a wheel with the CUDA backend"
mkdir -p "$out/py"
if [ -x .venv/bin/maturin ]; then
  (cd bindings/python && ../../.venv/bin/maturin build --release --strip -q --features cuda -o "../../$out/py" -i ../../.venv/bin/python)
  cp bindings/python/tests/test_cuda.py "$out/py/"
else
  echo "   (no maturin in .venv: run scripts/setup.sh for the Python check)"
fi
report=$(ls -t target/release/build/kvsieve-*/out/ptxas-report.txt 2>/dev/null | head -1 || true)
[ -n "$report" ] && cp "$report" "$out/ptxas-report.txt"

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU (sm_80 or newer) and its driver: the CUDA tests, then
# the GPU figures. Exit status 0 when every test passed and every figure was measured.
set -uo pipefail
cd "$(dirname "$0")"
fail=0
start=$(date +%s)
for t in bin/test-*; do
  echo "== $t"
  timeout 300 "$t" --test-threads=1 || fail=1
done
echo "== figures"
mkdir -p out
timeout 240 bin/bench-gpu_report --dump out/sdpa --json out/gpu_report.json || fail=1
# Hook: every other GPU bench (benches/gpu_*.rs, e.g. the k-means figure) runs here.
for b in bin/bench-gpu_*; do
  [ "$b" = bin/bench-gpu_report ] && continue
  echo "== $b"
  timeout 120 "$b" || fail=1
done
whl=$(ls py/kvsieve-*.whl 2>/dev/null | head -1 || true)
if [ -n "$whl" ] && python3 -c "import numpy, pytest, torch" 2>/dev/null; then
  echo "== Python: __dlpack__ device arrays (torch) through the wheel"
  rm -rf py/site && python3 -m zipfile -e "$whl" py/site \
    && PYTHONPATH=py/site timeout 120 python3 -m pytest -q -p no:cacheprovider py/test_cuda.py || fail=1
else
  echo "== Python check skipped (needs the wheel, numpy, pytest and torch)"
fi
if [ -f out/sdpa/meta.json ] && ! python3 -c "import torch" 2>/dev/null; then
  echo "== torch comparison skipped (no torch)"
elif [ -f out/sdpa/meta.json ]; then
  echo "== dense decode against torch scaled_dot_product_attention"
  timeout 120 python3 gpu_sdpa.py out/sdpa --json out/sdpa.json || fail=1
  rm -f out/sdpa/*.bin
fi
echo "== done in $(( $(date +%s) - start )) s, status $fail"
exit $fail
RUN
chmod +x "$out/run.sh"
size_mib=$(( $(du -sk "$out" | cut -f1) / 1024 ))
echo "== $out ready ($size_mib MiB): copy it to a GPU machine and run $out/run.sh"
if [ "$size_mib" -gt 60 ]; then
  echo "warning: $out is $size_mib MiB, more than a 64 MiB transfer allows with room to spare" >&2
fi
if [ "${1:-}" = "--run" ]; then
  exec "$out/run.sh"
fi
