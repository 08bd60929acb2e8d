#!/usr/bin/env bash
# Builds the Python wheel (abi3: one wheel per platform serves CPython >= 3.9) with maturin
# into target/wheels/ and installs it into the repo's .venv.
#
#   bash scripts/build-wheel.sh [--release | --profile NAME | other maturin options] [--manylinux]
#
# Without options it builds with --release. That is the quick local build, tagged for this
# machine's glibc (for example manylinux_2_34).
#
# --manylinux builds the portable wheel to publish instead: linked by zig against glibc 2.17
# (`maturin build --zig --compatibility manylinux2014`; tag
# manylinux2014_x86_64.manylinux_2_17_x86_64 on x86-64), then checked with `auditwheel show`.
# It builds in its own cargo folder, target/manylinux, so switching between the two builds
# does not rebuild everything, and installs ziglang and auditwheel through scripts/setup.sh.
#
# --sdist makes the source distribution instead (target/wheels/kvsieve-<version>.tar.gz, with
# the core crate inside; `pip install` of it builds anywhere with a Rust toolchain): `maturin
# sdist`, then bindings/python/fix_sdist.py, which drops from it the cargo targets whose
# files it does not hold (maturin leaves the core crate's benches declared).
set -euo pipefail
cd "$(dirname "$0")/.."

manylinux=0
sdist=0
args=()
for a in "$@"; do
  case "$a" in
    --manylinux) manylinux=1 ;;
    --sdist) sdist=1 ;;
    *) args+=("$a") ;;
  esac
done

if [ "$sdist" = 1 ]; then
  rm -f target/wheels/kvsieve-*.tar.gz
  (cd bindings/python && ../../.venv/bin/maturin sdist ${args[@]+"${args[@]}"} -o ../../target/wheels)
  .venv/bin/python bindings/python/fix_sdist.py target/wheels/kvsieve-*.tar.gz
  exit 0
fi
[ ${#args[@]} -gt 0 ] || args=(--release)

rm -f target/wheels/kvsieve-*.whl
if [ "$manylinux" = 1 ]; then
  bash scripts/setup.sh ziglang auditwheel
  # maturin runs zig as `python3 -m ziglang`, with the python3 it finds on PATH.
  (cd bindings/python && PATH="$PWD/../../.venv/bin:$PATH" ../../.venv/bin/maturin build "${args[@]}" -q \
    --zig --compatibility manylinux2014 --target-dir ../../target/manylinux \
    -o ../../target/wheels -i ../../.venv/bin/python)
  report=$(.venv/bin/auditwheel show target/wheels/kvsieve-*.whl)
  echo "$report"
  if ! grep -q '"manylinux_2_17_' <<<"$report"; then
    echo "build-wheel.sh: auditwheel does not place the wheel in manylinux_2_17 (manylinux2014)" >&2
    exit 1
  fi
else
  (cd bindings/python && ../../.venv/bin/maturin build "${args[@]}" -q -o ../../target/wheels -i ../../.venv/bin/python)
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps target/wheels/kvsieve-*.whl
