#!/usr/bin/env bash
# Installs what the tests and benchmarks need: libclang (for the header check), valgrind
# (C tests run under it when present), binutils (nm, readelf, objcopy, strip), a C compiler,
# pkg-config and cmake (the install test builds a C program against the installed library
# both ways), and a Python venv inside the repo with maturin, numpy and pytest, plus gguf
# and tokenizers for the real-model reference in examples/llama/tests. Idempotent; safe to
# run every time.
#
#   bash scripts/setup.sh                   everything; extra arguments are more pip packages
#                                           for the venv (build-wheel.sh --manylinux asks for
#                                           ziglang and auditwheel)
#   bash scripts/setup.sh --debian-only     only the Debian packages
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so'  || need_apt+=(libclang-dev)
command -v valgrind >/dev/null || need_apt+=(valgrind)
{ command -v nm && command -v readelf && command -v objcopy && command -v strip; } >/dev/null || need_apt+=(binutils)
command -v cc >/dev/null || need_apt+=(gcc)
command -v c++ >/dev/null || need_apt+=(g++)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v cmake >/dev/null || need_apt+=(cmake)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ "${1:-}" = --debian-only ]; then
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check maturin numpy pytest gguf tokenizers "$@"
