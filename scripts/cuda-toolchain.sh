#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, NVVM, headers) from NVIDIA's pip
# wheels into the repository's venv (.venv, created by scripts/setup.sh) and prints the
# nvcc path. No system CUDA toolkit is needed to build the kernels:
#   export NVCC=$(bash scripts/cuda-toolchain.sh) && cargo build --features cuda
# Idempotent. Progress goes to stderr; stdout is only the path.
set -euo pipefail
cd "$(dirname "$0")/.."

# nvcc preprocesses with the host C++ compiler.
if ! command -v g++ >/dev/null; then
  echo "== installing g++ (nvcc's host compiler)" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >&2
fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv" >&2
  python3 -m venv .venv
fi
# nvvm must stay at the compiler's exact version (nvcc refuses a mismatched libnvvm).
pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88)
if ! .venv/bin/python -m pip show -q "${pkgs[@]%%==*}" >/dev/null 2>&1 \
  || [ -n "$(.venv/bin/python -m pip freeze 2>/dev/null | grep -E '^nvidia-(cuda-nvcc|nvvm)==' | grep -v '==13.0.88$' || true)" ]; then
  echo "== installing the CUDA 13.0 compiler wheels into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check "${pkgs[@]}" >&2
fi
nvcc="$(.venv/bin/python - <<'PY'
import glob, os, sys
hits = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "cu13", "bin", "nvcc"))
print(os.path.abspath(hits[0]) if hits else "")
PY
)"
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  echo "error: nvcc not found in .venv after installing ${pkgs[*]}" >&2
  exit 1
fi
"$nvcc" --version >/dev/null
echo "$nvcc"
