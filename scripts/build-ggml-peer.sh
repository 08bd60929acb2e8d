#!/usr/bin/env bash
# Builds the peer of the decode figures, ggml's CPU flash attention, into target/ggml-peer/.
#
# ggml comes from the pinned llama.cpp source (scripts/fetch-llama-cpp.sh, unpacked into
# target/ggml-peer/src) and is built static, Release, for the native ISA (scripts/ggml-isa.sh:
# AMX switched off where the machine lists it but cannot run it), with the options
# llama.cpp's own CMakeLists.txt gives it (llamafile sgemm on, OpenMP if found), together
# with benches/ggml_fa/ggml_fa_bench.c and nothing of llama.cpp itself.
#
# Usage: scripts/build-ggml-peer.sh [--jobs N]
# Prints the path of the program (target/ggml-peer/build/bin/ggml_fa_bench) on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=2
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build-ggml-peer.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

out="$root/target/ggml-peer"
src=$(bash "$root/scripts/fetch-llama-cpp.sh" "$out/src" | tail -n 1)
build="$out/build"
# ggml's instruction sets: native, without AMX where the machine lists it but cannot run it
mapfile -t isa < <(bash "$root/scripts/ggml-isa.sh")
isa_used="${isa[*]}"
# configure again when the source was unpacked again (its stamp is newer than the cache) or
# the instruction sets changed
if [ ! -f "$build/CMakeCache.txt" ] || [ "$src/.llama-cpp-stamp" -nt "$build/CMakeCache.txt" ] \
   || ! grep -qxF "KVSIEVE_GGML_ISA:STRING=$isa_used" "$build/CMakeCache.txt"; then
  echo "== configuring ggml (static, Release, native ISA) from $src" >&2
  rm -rf "$build"
  cmake -S "$root/benches/ggml_fa" -B "$build" -DLLAMA_CPP_DIR="$src" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF "${isa[@]}" -DKVSIEVE_GGML_ISA:STRING="$isa_used" -DGGML_LLAMAFILE=ON \
    -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF >&2
fi
echo "== building ggml_fa_bench (-j$jobs)" >&2
cmake --build "$build" -j "$jobs" --target ggml_fa_bench >&2
echo "$build/bin/ggml_fa_bench"
