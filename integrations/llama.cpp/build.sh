#!/usr/bin/env bash
# Builds llama.cpp with attention through kvsieve into target/llama.cpp/.
#
# The llama.cpp source is the copy that llama-cpp-python 0.3.36 vendors (vendor/llama.cpp,
# llama.cpp commit 0c1e57098bba), taken from its sdist on PyPI and checked by sha256 by
# scripts/fetch-llama-cpp.sh into target/llama.cpp/upstream. It is copied to
# target/llama.cpp/src, patched with llama-kvsieve.patch,
# given our sources (src/llama-kvsieve.{h,cpp}) and built (CPU, Release, native ISA) for the
# targets needed here only, plus our evaluation tool (tools/llama-kvsieve-eval.cpp).
#
# kvsieve comes from an installed prefix (scripts/install.sh --prefix DIR): headers in
# DIR/include (kvsieve.h, kvsieve/*.h), DIR/lib/libkvsieve.so, and either the CMake package
# (find_package(kvsieve CONFIG) -> kvsieve::kvsieve, under DIR) or DIR/lib/pkgconfig/kvsieve.pc.
#
# Usage: integrations/llama.cpp/build.sh [--kvsieve-prefix DIR] [--jobs N] [--targets "T ..."]
# Prints the folder of the binaries (target/llama.cpp/build/bin) on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

LLAMA_CPP_COMMIT=0c1e57098bba   # as pinned by scripts/fetch-llama-cpp.sh

prefix="$root/target/kvsieve-prefix"
jobs=2
targets="llama-perplexity llama-bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --kvsieve-prefix) prefix="$2"; shift 2 ;;
    --kvsieve-prefix=*) prefix="${1#*=}"; shift ;;
    --jobs) jobs="$2"; shift 2 ;;
    --targets) targets="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
prefix=$(cd "$prefix" 2>/dev/null && pwd) || { echo "build.sh: no kvsieve prefix at $prefix (install kvsieve there: scripts/install.sh --prefix DIR)" >&2; exit 1; }
if [ ! -f "$prefix/include/kvsieve.h" ] || ! ls "$prefix"/lib*/libkvsieve.so >/dev/null 2>&1; then
  echo "build.sh: $prefix lacks include/kvsieve.h or lib/libkvsieve.so" >&2
  exit 1
fi

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

out="$root/target/llama.cpp"
mkdir -p "$out"
# the pinned, unpatched source (scripts/fetch-llama-cpp.sh: download once, sha256, unpack)
upstream=$(bash "$root/scripts/fetch-llama-cpp.sh" "$out/upstream" | tail -n 1)

# copy and patch again whenever the patch changes
src="$out/src"
stamp="$(sha256sum "$here/llama-kvsieve.patch" | cut -c1-16)-$LLAMA_CPP_COMMIT"
if [ "$(cat "$src/.kvsieve-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "== copying llama.cpp $LLAMA_CPP_COMMIT to $src and patching it" >&2
  rm -rf "$src" "$out/build"
  cp -a "$upstream" "$src"
  rm -f "$src/.llama-cpp-stamp"
  patch -d "$src" -p1 --quiet --forward < "$here/llama-kvsieve.patch"
  echo "$stamp" > "$src/.kvsieve-stamp"
fi
for f in llama-kvsieve.h llama-kvsieve.cpp; do
  cmp -s "$here/src/$f" "$src/src/$f" || cp "$here/src/$f" "$src/src/$f"
done

build="$out/build"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig:$prefix/lib64/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
# ggml's instruction sets: native, without AMX where the machine lists it but cannot run it
mapfile -t isa < <(bash "$root/scripts/ggml-isa.sh")
isa_used="${isa[*]}"
if [ ! -f "$build/CMakeCache.txt" ] || ! grep -q "^KVSIEVE_PREFIX_USED:STRING=$prefix\$" "$build/CMakeCache.txt" \
   || ! grep -qxF "KVSIEVE_GGML_ISA:STRING=$isa_used" "$build/CMakeCache.txt"; then
  echo "== configuring (CPU, Release, native ISA) against kvsieve at $prefix" >&2
  rm -rf "$build"
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DKVSIEVE_GGML_ISA:STRING="$isa_used" -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_SUBPROCESS=OFF \
    -DCMAKE_PREFIX_PATH="$prefix" -DKVSIEVE_PREFIX_USED:STRING="$prefix" >&2
fi
echo "== building $targets (-j$jobs)" >&2
cmake --build "$build" -j "$jobs" --target llama $targets >&2

# our evaluation tool, against the libraries just built
bin="$build/bin"
tool="$bin/llama-kvsieve-eval"
if [ ! -x "$tool" ] || [ "$here/tools/llama-kvsieve-eval.cpp" -nt "$tool" ] || [ "$bin/libllama.so" -nt "$tool" ]; then
  echo "== building llama-kvsieve-eval" >&2
  g++ -O2 -std=c++17 -Wall -Wextra -o "$tool" "$here/tools/llama-kvsieve-eval.cpp" \
    -I"$src/include" -I"$src/ggml/include" -L"$bin" -lllama -lggml -lggml-base -Wl,-rpath,"$bin" -lpthread
fi
echo "$bin"
