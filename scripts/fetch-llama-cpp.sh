#!/usr/bin/env bash
# Unpacks the pinned, unpatched llama.cpp source into DEST_DIR.
#
# The source is the copy that llama-cpp-python 0.3.36 vendors (vendor/llama.cpp, llama.cpp
# commit 0c1e57098bba), taken from its sdist on PyPI: downloaded once into
# target/llama.cpp-sdist/ (an sdist already at target/llama.cpp/ is reused), checked against
# the sha256 below, and unpacked. DEST_DIR gets a stamp file (.llama-cpp-stamp); a DEST_DIR
# whose stamp matches is left as it is, one with another stamp or empty is replaced, and a
# non-empty one without a stamp is refused (it is not ours to delete).
#
# Usage: scripts/fetch-llama-cpp.sh DEST_DIR
# Prints DEST_DIR (absolute) on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_CPP_COMMIT=0c1e57098bba

if [ $# -ne 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
mkdir -p "$1"
dest=$(cd "$1" && pwd)
stamp="llama-cpp-python-$VERSION-$SHA256-$LLAMA_CPP_COMMIT"
if [ "$(cat "$dest/.llama-cpp-stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$dest"
  exit 0
fi
if [ ! -f "$dest/.llama-cpp-stamp" ] && [ -n "$(ls -A "$dest")" ]; then
  echo "fetch-llama-cpp.sh: $dest is not empty and was not unpacked by this script; not replacing it" >&2
  exit 1
fi

name="llama_cpp_python-$VERSION.tar.gz"
cache="$root/target/llama.cpp-sdist"
sdist="$cache/$name"
if [ ! -s "$sdist" ] && [ -s "$root/target/llama.cpp/$name" ]; then
  mkdir -p "$cache"
  cp "$root/target/llama.cpp/$name" "$sdist.part" && mv "$sdist.part" "$sdist"
fi
if [ ! -s "$sdist" ]; then
  echo "== fetching llama-cpp-python==$VERSION (sdist) from PyPI" >&2
  mkdir -p "$cache"
  pip=("$root/.venv/bin/python" -m pip)
  [ -x "$root/.venv/bin/python" ] || pip=(python3 -m pip)
  "${pip[@]}" download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$cache" >&2
fi
if ! echo "$SHA256  $sdist" | sha256sum -c --quiet - >&2; then
  echo "fetch-llama-cpp.sh: sha256 mismatch for $sdist (remove it to download again)" >&2
  exit 1
fi

echo "== unpacking vendor/llama.cpp (llama.cpp $LLAMA_CPP_COMMIT) into $dest" >&2
# Unpack beside DEST_DIR and swap it in, so an interrupted run never leaves a stamped,
# partial tree.
tmp=$(mktemp -d "$dest.unpack.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
tar xzf "$sdist" -C "$tmp" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
rm -f "$tmp/.git"
echo "$stamp" > "$tmp/.llama-cpp-stamp"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "$dest"
