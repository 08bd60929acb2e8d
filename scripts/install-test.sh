#!/usr/bin/env bash
# The install, tested as an engine would use it: scripts/install.sh into a temporary prefix,
# then examples/c/01_store_and_decode.c, copied into a temporary directory outside the
# repository, is built and run three ways:
#   (a) shared:  cc $(pkg-config --cflags --libs kvsieve), PKG_CONFIG_PATH=PREFIX/lib/pkgconfig,
#                an rpath to PREFIX/lib;
#   (b) static:  pkg-config --static --libs kvsieve, linking libkvsieve.a (no libkvsieve.so needed
#                at run time);
#   (c) CMake:   find_package(kvsieve CONFIG REQUIRED) with -DCMAKE_PREFIX_PATH=PREFIX, one program
#                linked to kvsieve::kvsieve and one to kvsieve::kvsieve_static.
# It also checks the installed tree: the SONAME (libkvsieve.so.<major>), the symlinks, and that
# the shared library exports only kvsieve_* symbols. Any failure fails the script.
#
# usage: scripts/install-test.sh [--cuda]    (--cuda: install with the CUDA backend)
#        KVSIEVE_KEEP_INSTALL_TEST=1 keeps the temporary directories (their paths are printed).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

bash scripts/setup.sh --debian-only

prefix="$(mktemp -d -t kvsieve-prefix.XXXXXX)"
work="$(mktemp -d -t kvsieve-consumer.XXXXXX)"
cleanup() {
  if [ "${KVSIEVE_KEEP_INSTALL_TEST:-0}" = 1 ]; then
    echo "kept: prefix $prefix, consumer $work" >&2
  else
    rm -rf "$prefix" "$work"
  fi
}
trap cleanup EXIT
case "$work/" in
  "$repo"/*) echo "install-test: the temporary directory $work is inside the repository (TMPDIR?)" >&2; exit 1 ;;
esac

fail() {
  echo "install-test: FAILED: $*" >&2
  exit 1
}

echo "== scripts/install.sh --prefix $prefix $*"
bash scripts/install.sh --prefix "$prefix" "$@"
version="$(PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --modversion kvsieve)"
major="${version%%.*}"
lib="$prefix/lib"

echo "== the installed tree"
(cd "$prefix" && find . | sort)
for f in include/kvsieve.h include/kvsieve/cache.h "lib/libkvsieve.so.$version" lib/libkvsieve.a \
    lib/pkgconfig/kvsieve.pc lib/cmake/kvsieve/kvsieveConfig.cmake lib/cmake/kvsieve/kvsieveConfigVersion.cmake; do
  [ -f "$prefix/$f" ] || fail "$f is not installed"
done
[ "$(readlink "$lib/libkvsieve.so.$major")" = "libkvsieve.so.$version" ] || fail "libkvsieve.so.$major does not point to libkvsieve.so.$version"
[ "$(readlink "$lib/libkvsieve.so")" = "libkvsieve.so.$major" ] || fail "libkvsieve.so does not point to libkvsieve.so.$major"
ls -l "$lib"

echo "== SONAME and exported symbols of libkvsieve.so.$version"
soname="$(readelf -d "$lib/libkvsieve.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
echo "SONAME $soname"
[ "$soname" = "libkvsieve.so.$major" ] || fail "SONAME is '$soname', expected libkvsieve.so.$major"
symbols="$(nm -D --defined-only "$lib/libkvsieve.so.$version" | awk '{print $NF}')"
exported="$(echo "$symbols" | grep -c '^kvsieve_' || true)"
others="$(echo "$symbols" | grep -v '^kvsieve_' | grep -v '^$' || true)"
echo "$exported kvsieve_* symbols exported"
[ -z "$others" ] || fail "symbols other than kvsieve_* are exported: $(echo $others | head -c 500)"
[ "$exported" -gt 100 ] || fail "only $exported kvsieve_* symbols are exported"

cp examples/c/01_store_and_decode.c "$work/"
cd "$work"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
unset LD_LIBRARY_PATH

# Runs a built program (no LD_LIBRARY_PATH: the rpath or a static link must suffice) and
# checks the lines the example prints.
run_demo() {
  local what="$1" exe="$2" out
  out="$("$exe")" || fail "$what: $exe exited with status $?"
  echo "$out" | sed 's/^/   /'
  echo "$out" | grep -qx "stored a prompt of 20 tokens in 2 layers" || fail "$what: unexpected output"
  echo "$out" | grep -qx "decoded 1 token over 21 cached tokens" || fail "$what: unexpected output"
  echo "ok - $what"
}
needs_shared() { readelf -d "$1" | grep -q "(NEEDED).*\[libkvsieve\.so\.$major\]"; }

echo "== (a) shared, with pkg-config: cc \$(pkg-config --cflags --libs kvsieve)"
# shellcheck disable=SC2046
cc -std=c99 -Wall -Wextra -Werror -o demo_shared 01_store_and_decode.c $(pkg-config --cflags --libs kvsieve) -lm \
  -Wl,-rpath,"$(pkg-config --variable=libdir kvsieve)" || fail "(a) the build failed"
needs_shared demo_shared || fail "(a) demo_shared does not load libkvsieve.so.$major"
run_demo "(a) shared library through pkg-config" ./demo_shared

echo "== (b) static, with pkg-config --static: libkvsieve.a and Libs.private"
static_libs="$(pkg-config --static --libs kvsieve)"
echo "   pkg-config --static --libs kvsieve: $static_libs"
# -lkvsieve would pick the shared library, installed beside the archive; -l:libkvsieve.a names the archive.
static_libs="$(echo " $static_libs " | sed 's/ -lkvsieve / -l:libkvsieve.a /')"
# shellcheck disable=SC2046,SC2086
cc -std=c99 -Wall -Wextra -Werror -o demo_static 01_store_and_decode.c $(pkg-config --cflags kvsieve) $static_libs -lm \
  || fail "(b) the build failed"
if readelf -d demo_static | grep -q "(NEEDED).*libkvsieve"; then fail "(b) demo_static needs libkvsieve.so"; fi
run_demo "(b) static library through pkg-config --static" ./demo_static

echo "== (c) CMake: find_package(kvsieve CONFIG REQUIRED), kvsieve::kvsieve and kvsieve::kvsieve_static"
mkdir cmake-project
mv 01_store_and_decode.c cmake-project/
cat >cmake-project/CMakeLists.txt <<EOF
cmake_minimum_required(VERSION 3.16)
project(kvsieve_consumer C)
set(CMAKE_C_STANDARD 99)

# A version this install cannot satisfy is refused; an older one of the same major version
# is satisfied (include/kvsieve/version.h: a newer library runs programs of older headers).
find_package(kvsieve 999 CONFIG QUIET)
if(kvsieve_FOUND)
  message(FATAL_ERROR "find_package(kvsieve 999) accepted kvsieve \${kvsieve_VERSION}")
endif()
find_package(kvsieve $major.0 CONFIG QUIET)
if(NOT kvsieve_FOUND)
  message(FATAL_ERROR "find_package(kvsieve $major.0) refused kvsieve $version")
endif()

find_package(kvsieve $version CONFIG REQUIRED)
message(STATUS "kvsieve \${kvsieve_VERSION} from \${kvsieve_DIR}")

add_executable(demo 01_store_and_decode.c)
target_link_libraries(demo PRIVATE kvsieve::kvsieve m)

add_executable(demo_static 01_store_and_decode.c)
target_link_libraries(demo_static PRIVATE kvsieve::kvsieve_static m)
EOF
cmake -S cmake-project -B cmake-build -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >cmake-configure.log 2>&1 \
  || { cat cmake-configure.log >&2; fail "(c) cmake configure failed"; }
grep "kvsieve $version from" cmake-configure.log | sed 's/^/   /' || true
cmake --build cmake-build >cmake-build.log 2>&1 || { cat cmake-build.log >&2; fail "(c) cmake build failed"; }
needs_shared cmake-build/demo || fail "(c) demo does not load libkvsieve.so.$major"
if readelf -d cmake-build/demo_static | grep -q "(NEEDED).*libkvsieve"; then fail "(c) demo_static needs libkvsieve.so"; fi
run_demo "(c) CMake, kvsieve::kvsieve" cmake-build/demo
run_demo "(c) CMake, kvsieve::kvsieve_static" cmake-build/demo_static

echo "== install test passed: libkvsieve $version, $(du -k "$lib/libkvsieve.so.$version" | cut -f1) KiB shared, $(du -k "$lib/libkvsieve.a" | cut -f1) KiB static"
