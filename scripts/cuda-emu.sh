#!/usr/bin/env bash
# Runs kvsieve's CUDA kernels on the CPU: compiles every cuda/*.cu with g++ against a CPU
# emulation of the CUDA execution model (tests/cuda_emu: one fiber per thread, warp
# collectives and mma.sync emulated) into target/cuda-emu/libcuda.so, a stand-in for the
# driver, then runs the GPU-against-CPU tests (tests/cuda_*.rs of the core and
# crates/kvsieve-c/tests/cuda_*.rs of the C library) with that library first on
# LD_LIBRARY_PATH. This checks the kernels' arithmetic, indexing and synchronisation
# without a GPU; it says nothing about speed, and blocks run one after another, so it
# cannot show races. The tests report the device as "kvsieve CUDA emulator (CPU)".
#
#   bash scripts/cuda-emu.sh            build the library and run the tests
#   bash scripts/cuda-emu.sh build      build only (prints the library's folder)
#   bash scripts/cuda-emu.sh test ARGS  build, then cargo test with ARGS after the test list
#                                       (in the core, then in the C library)
#   bash scripts/cuda-emu.sh gpu-check  a dry run of scripts/gpu-check.sh's run.sh on the
#                                       emulator at small sizes (the script's flow, not its
#                                       figures), before spending time on a lent GPU
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"
[ $# -gt 0 ] && shift

nvcc="$(bash scripts/cuda-toolchain.sh)"
inc="$(cd "$(dirname "$nvcc")/../include" && pwd)"
out=target/cuda-emu
gen="$out/gen"
mkdir -p "$gen"
cxx=(g++ -std=c++17 -O2 -g -fPIC -fno-strict-aliasing -w -DKVS_EMU -I "$inc" -I tests/cuda_emu -include tests/cuda_emu/kvs_emu.h)

# Compile $1 into $2 in the background, two compilers at a time. The old object goes first,
# so a failed compile cannot leave a stale one to link; any failure stops the build below.
pids=()
failed=0
compile() {
  rm -f "$2"
  "${cxx[@]}" -c "$1" -o "$2" &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do sleep 0.2; done
}

# One translation unit per .cu file: the file itself, then a table registering each of its
# kernels (found in the preprocessed source) under its name.
objs=()
for src in cuda/*.cu; do
  name="$(basename "$src" .cu)"
  unit="$gen/$name.cpp"
  obj="$gen/$name.o"
  objs+=("$obj")
  if [ -f "$obj" ] && [ "$obj" -nt "$src" ] && [ -z "$(find cuda scripts/cuda-emu.sh tests/cuda_emu/kvs_emu.h tests/cuda_emu/runtime.h -newer "$obj" -print -quit)" ]; then
    continue
  fi
  {
    echo "#include \"runtime.h\""
    echo "#include \"$PWD/$src\""
    echo "namespace {"
    "${cxx[@]}" -x c++ -E "$src" \
      | tr '\n' ' ' \
      | grep -oE 'extern "C" +void +[A-Za-z_0-9]+ *\( *const +[A-Za-z_0-9]+ +p *\)' \
      | sed -E 's/extern "C" +void +([A-Za-z_0-9]+) *\( *const +([A-Za-z_0-9]+) +p *\)/\1 \2/' \
      | sort -u \
      | while read -r kernel params; do
          echo "kvs_emu::Reg reg_$kernel(\"$kernel\", [](void** a) { $kernel(*static_cast<const $params*>(a[0])); }, sizeof($params));"
        done
    echo "}  // namespace"
  } > "$unit"
  echo "== emulator: compiling $src ($(grep -c 'kvs_emu::Reg reg_' "$unit") kernels)" >&2
  compile "$unit" "$obj"
done
for src in tests/cuda_emu/runtime.cpp tests/cuda_emu/driver.cpp; do
  obj="$gen/$(basename "$src" .cpp).o"
  objs+=("$obj")
  if [ -f "$obj" ] && [ -z "$(find tests/cuda_emu -newer "$obj" -print -quit)" ]; then continue; fi
  compile "$src" "$obj"
done
for pid in "${pids[@]}"; do
  wait "$pid" || failed=1
done
if [ "$failed" = 1 ]; then
  echo "error: the emulator build failed (see the compiler output above)" >&2
  exit 1
fi
g++ -shared -o "$out/libcuda.so" "${objs[@]}" -lpthread
ln -sf libcuda.so "$out/libcuda.so.1"
lib="$(cd "$out" && pwd)"
if [ "$mode" = build ]; then
  echo "$lib"
  exit 0
fi

export NVCC="$nvcc"
if [ "$mode" = gpu-check ]; then
  bash scripts/gpu-check.sh
  echo "== target/gpu-check/run.sh on the emulator (sizes / 64: the figures mean nothing)" >&2
  KVSIEVE_GPU_REPORT_SCALE=64 KVSIEVE_KMEANS_KEYS=1024 KVSIEVE_KMEANS_REPS=1 \
    LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" target/gpu-check/run.sh
  exit $?
fi
echo "== CUDA tests on the emulator ($lib/libcuda.so)" >&2
log="$out/launched.txt"
rm -f "$log"
KVSIEVE_EMU_LAUNCHED="$PWD/$log" LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --features cuda --test 'cuda_*' "$@"
# The kvsieve_cuda_* C entry points (crates/kvsieve-c/tests/cuda_ffi.rs).
echo "== CUDA tests of the C library on the emulator" >&2
KVSIEVE_EMU_LAUNCHED="$PWD/$log" LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test -p kvsieve-c --features cuda --test 'cuda_*' "$@"
# The Python CUDA tests (bindings/python/tests/test_cuda.py) through a wheel built with the
# `cuda` feature, device arrays from tests/emu_torch.py in the emulator's memory. Their
# launches count below too.
filtered=0
case "${1:-}" in "" | -*) ;; *) filtered=1 ;; esac
if [ -x .venv/bin/maturin ] && [ "$filtered" = 0 ]; then
  echo "== Python CUDA tests on the emulator" >&2
  rm -rf "$out/py" && mkdir -p "$out/py"
  (cd bindings/python && ../../.venv/bin/maturin build -q --features cuda -o "../../$out/py" -i ../../.venv/bin/python)
  .venv/bin/python -m zipfile -e "$(ls "$out"/py/kvsieve-*.whl | head -1)" "$out/py/site"
  KVSIEVE_CUDA_EMU=1 KVSIEVE_EMU_LAUNCHED="$PWD/$log" PYTHONPATH="$out/py/site:bindings/python/tests" \
    LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    .venv/bin/python -m pytest -q -p no:cacheprovider bindings/python/tests/test_cuda.py
else
  echo "== Python CUDA tests skipped (needs .venv/bin/maturin from scripts/setup.sh; not run with a test filter)" >&2
fi
# Kernels no test launched (each must be reached by some comparison with the CPU).
all="$(sed -nE 's/^kvs_emu::Reg reg_([A-Za-z_0-9]+)\(.*/\1/p' "$gen"/*.cpp | sort -u)"
ran="$(awk '{print $1}' "$log" 2>/dev/null | sort -u)"
missing="$(comm -23 <(echo "$all") <(echo "$ran"))"
echo "== emulator: $(echo "$ran" | grep -c . || true) of $(echo "$all" | grep -c .) kernels launched by the tests" >&2
if [ -n "$missing" ]; then
  echo "   never launched: $(echo $missing)" >&2
  # scripts/test.sh sets this: every kernel must be compared with the CPU by some test.
  if [ "${KVSIEVE_EMU_REQUIRE_ALL:-0}" = 1 ]; then
    echo "error: kernels above are not reached by any test" >&2
    exit 1
  fi
fi
