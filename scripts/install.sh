#!/usr/bin/env bash
# Builds the C library (crates/kvsieve-c, release) and installs it for C and C++ engines:
#
#   PREFIX/include/kvsieve.h, PREFIX/include/kvsieve/*.h     the headers
#   PREFIX/lib/libkvsieve.so.X.Y.Z                           the shared library, SONAME libkvsieve.so.X,
#   PREFIX/lib/libkvsieve.so.X -> libkvsieve.so.X.Y.Z        exporting only the kvsieve_* functions
#   PREFIX/lib/libkvsieve.so   -> libkvsieve.so.X            (what -lkvsieve finds)
#   PREFIX/lib/libkvsieve.a                                  the static library
#   PREFIX/lib/.debug/libkvsieve.so.X.Y.Z.debug              the shared library's debug info (see below)
#   PREFIX/lib/pkgconfig/kvsieve.pc                          pkg-config: cflags, libs, and the system
#                                                            libraries a static link needs (Libs.private)
#   PREFIX/lib/cmake/kvsieve/kvsieveConfig.cmake             CMake: find_package(kvsieve CONFIG REQUIRED)
#   PREFIX/lib/cmake/kvsieve/kvsieveConfigVersion.cmake      gives kvsieve::kvsieve (shared) and
#                                                            kvsieve::kvsieve_static
#
# X.Y.Z is the version in Cargo.toml ([workspace.package] version), the one place it is set.
#
# Debug info: the release profile keeps line tables (debug = 1), which makes the shared
# library about 16 MB. The installed copy is stripped of them (strip --strip-debug: the
# symbol table stays, so backtraces and profilers still name functions); they are kept
# beside it in lib/.debug/, linked with objcopy --add-gnu-debuglink, where gdb looks for
# them. The static library is installed stripped of debug info too. --no-strip installs
# both as built.
#
# usage: scripts/install.sh --prefix DIR [--cuda] [--no-strip]
#   --cuda       build with the CUDA backend (nvcc from NVCC, else scripts/cuda-toolchain.sh);
#                without it the kvsieve_cuda_* functions answer KVSIEVE_ERROR_CUDA_UNAVAILABLE
#   --no-strip   install the libraries with their debug info
# DESTDIR, when set, is prepended to every installed path (for packaging); the files
# written (kvsieve.pc) name PREFIX itself.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
prefix=""
cuda=0
strip_debug=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || usage; prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --cuda) cuda=1; shift ;;
    --no-strip) strip_debug=0; shift ;;
    -h | --help) usage ;;
    *) echo "install.sh: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$prefix" ] || usage
case "$(uname -s)" in
  Linux) ;;
  *) echo "install.sh: installs the Linux shared library layout (libkvsieve.so.X); this is $(uname -s)" >&2; exit 1 ;;
esac
mkdir -p "${DESTDIR:-}$prefix"
# An absolute prefix: kvsieve.pc names it.
prefix="$(cd "${DESTDIR:-}$prefix" && pwd)"
prefix="${prefix#"${DESTDIR:-}"}"
dest="${DESTDIR:-}$prefix"

# The version: Cargo.toml's, through cargo (`cargo pkgid` ends in `#kvsieve-c@X.Y.Z`).
version="$(cargo pkgid -p kvsieve-c)"
version="${version##*[#@:]}"
if ! [[ "$version" =~ ^([0-9]+)\.([0-9]+)\.([0-9]+)$ ]]; then
  echo "install.sh: could not read the version of kvsieve-c (cargo pkgid gave $(cargo pkgid -p kvsieve-c))" >&2
  exit 1
fi
major="${BASH_REMATCH[1]}"

features=()
if [ "$cuda" = 1 ]; then
  NVCC="${NVCC:-$(bash scripts/cuda-toolchain.sh)}"
  export NVCC
  features=(--features cuda)
fi

# One build of the library (shared and static), which also reports the system libraries the
# static library needs (rustc's native-static-libs; cargo repeats it when nothing changed).
echo "== building libkvsieve $version (release${features:+, cuda})" >&2
log="$(mktemp)"
json="$(mktemp)"
trap 'rm -f "$log" "$json"' EXIT
if ! cargo rustc --release -p kvsieve-c --lib "${features[@]}" --message-format=json-render-diagnostics \
    -- --print native-static-libs >"$json" 2>"$log"; then
  cat "$log" >&2
  exit 1
fi
grep -v "native artifacts\|native-static-libs" "$log" | grep -v '^\s*$' >&2 || true
static_libs="$(sed -n 's/.*native-static-libs: *//p' "$log" | tail -1)"
if [ -z "$static_libs" ]; then
  echo "install.sh: rustc did not report the static library's native libraries" >&2
  exit 1
fi
so="$(grep -o '"[^"]*/libkvsieve\.so"' "$json" | tail -1 | tr -d '"')"
ar="$(grep -o '"[^"]*/libkvsieve\.a"' "$json" | tail -1 | tr -d '"')"
if [ ! -f "$so" ] || [ ! -f "$ar" ]; then
  echo "install.sh: cargo named no libkvsieve.so / libkvsieve.a (got '$so', '$ar')" >&2
  exit 1
fi

echo "== installing into ${DESTDIR:+$DESTDIR}$prefix" >&2
install -d "$dest/include/kvsieve" "$dest/lib/pkgconfig" "$dest/lib/cmake/kvsieve"
install -m 644 include/kvsieve.h "$dest/include/kvsieve.h"
install -m 644 include/kvsieve/*.h "$dest/include/kvsieve/"

real="libkvsieve.so.$version"
soname="libkvsieve.so.$major"
rm -f "$dest/lib/libkvsieve.so" "$dest/lib/$soname" "$dest/lib/$real" "$dest/lib/libkvsieve.a"
install -m 755 "$so" "$dest/lib/$real"
install -m 644 "$ar" "$dest/lib/libkvsieve.a"
ln -s "$real" "$dest/lib/$soname"
ln -s "$soname" "$dest/lib/libkvsieve.so"
if [ "$strip_debug" = 1 ]; then
  install -d "$dest/lib/.debug"
  rm -f "$dest/lib/.debug/$real.debug"
  objcopy --only-keep-debug "$dest/lib/$real" "$dest/lib/.debug/$real.debug"
  chmod 644 "$dest/lib/.debug/$real.debug"
  strip --strip-debug "$dest/lib/$real"
  # The link names the file; gdb finds it in .debug/ next to the library.
  (cd "$dest/lib" && objcopy --add-gnu-debuglink=".debug/$real.debug" "$real")
  strip --strip-debug "$dest/lib/libkvsieve.a"
fi

# pkg-config. Libs.private: what a static link adds (pkg-config --static --libs kvsieve).
cat >"$dest/lib/pkgconfig/kvsieve.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: kvsieve
Description: Paged KV cache, token selection and sparse attention for LLM inference engines
Version: $version
Libs: -L\${libdir} -lkvsieve
Libs.private: $static_libs
Cflags: -I\${includedir}
EOF

# CMake package: imported targets, located relative to this file (the prefix can move).
cmake_libs=""
for flag in $static_libs; do
  case "$flag" in
    -l*) cmake_libs="$cmake_libs${cmake_libs:+;}${flag#-l}" ;;
    *) cmake_libs="$cmake_libs${cmake_libs:+;}$flag" ;;
  esac
done
cat >"$dest/lib/cmake/kvsieve/kvsieveConfig.cmake" <<EOF
# kvsieve $version, installed by scripts/install.sh. find_package(kvsieve CONFIG REQUIRED) gives
#   kvsieve::kvsieve         the shared library (libkvsieve.so, SONAME $soname)
#   kvsieve::kvsieve_static  the static library (libkvsieve.a) and the system libraries it needs
# Both carry the include directory (#include <kvsieve.h>).
get_filename_component(_kvsieve_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

if(NOT TARGET kvsieve::kvsieve)
  add_library(kvsieve::kvsieve SHARED IMPORTED)
  set_target_properties(kvsieve::kvsieve PROPERTIES
    IMPORTED_LOCATION "\${_kvsieve_prefix}/lib/$real"
    IMPORTED_SONAME "$soname"
    INTERFACE_INCLUDE_DIRECTORIES "\${_kvsieve_prefix}/include")
endif()

if(NOT TARGET kvsieve::kvsieve_static)
  add_library(kvsieve::kvsieve_static STATIC IMPORTED)
  set_target_properties(kvsieve::kvsieve_static PROPERTIES
    IMPORTED_LOCATION "\${_kvsieve_prefix}/lib/libkvsieve.a"
    IMPORTED_LINK_INTERFACE_LANGUAGES "C"
    INTERFACE_INCLUDE_DIRECTORIES "\${_kvsieve_prefix}/include"
    INTERFACE_LINK_LIBRARIES "$cmake_libs")
endif()

set(kvsieve_INCLUDE_DIRS "\${_kvsieve_prefix}/include")
set(kvsieve_LIBRARIES kvsieve::kvsieve)
unset(_kvsieve_prefix)
EOF

# Version check: a release satisfies a request for any version of its major version up to
# its own, 0.x included (one ABI line per SONAME, libkvsieve.so.<major>: the compatibility
# rule of include/kvsieve/version.h); never across pointer sizes.
pointer_bytes=$(( $(getconf LONG_BIT) / 8 ))
cat >"$dest/lib/cmake/kvsieve/kvsieveConfigVersion.cmake" <<EOF
set(PACKAGE_VERSION "$version")

if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
elseif("\${PACKAGE_FIND_VERSION_MAJOR}" STREQUAL "$major")
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
else()
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
endif()
if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
  set(PACKAGE_VERSION_EXACT TRUE)
endif()

if(NOT "\${CMAKE_SIZEOF_VOID_P}" STREQUAL "" AND NOT "\${CMAKE_SIZEOF_VOID_P}" STREQUAL "$pointer_bytes")
  math(EXPR _kvsieve_bits "$pointer_bytes * 8")
  set(PACKAGE_VERSION "\${PACKAGE_VERSION} (\${_kvsieve_bits}-bit)")
  set(PACKAGE_VERSION_UNSUITABLE TRUE)
  unset(_kvsieve_bits)
endif()
EOF

echo "== installed libkvsieve $version into ${DESTDIR:+$DESTDIR}$prefix" >&2
echo "   pkg-config: PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs kvsieve" >&2
echo "   CMake:      -DCMAKE_PREFIX_PATH=$prefix, find_package(kvsieve CONFIG REQUIRED), kvsieve::kvsieve" >&2
