#!/usr/bin/env bash
# Builds the Python wheel (abi3) with maturin and installs it into the repo's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:---release}
rm -f target/wheels/kvsieve-*.whl
(cd bindings/python && ../../.venv/bin/maturin build $profile -q -o ../../target/wheels -i ../../.venv/bin/python)
.venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps target/wheels/kvsieve-*.whl
