#!/usr/bin/env bash
# Decode speed of llama.cpp on SmolLM2-135M-Instruct, 2 threads, at several context depths:
# stock (flash attention on and off), kvsieve dense and three sparse policies at a 1/8
# budget. Writes target/llama.cpp/results/bench-<depth>.jsonl (with `uptime` before and
# after each depth) and integrations/llama.cpp/speed.png. Prefilled contexts are kept in
# target/llama.cpp/state (about 23 KB per token; 0.75 GB at 32K) and reused.
#
# Usage: integrations/llama.cpp/bench.sh [--depths 4096,8192,16384,32768] [-n 32] [-r 3] [--kvsieve-prefix DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
depths=4096,8192,16384,32768
n=32
r=3
build_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --depths) depths="$2"; shift 2 ;;
    -n) n="$2"; shift 2 ;;
    -r) r="$2"; shift 2 ;;
    --kvsieve-prefix) build_args+=(--kvsieve-prefix "$2"); shift 2 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

bin=$(bash "$here/build.sh" "${build_args[@]}" | tail -n 1)
model=$(bash "$root/scripts/fetch-model.sh")
out="$root/target/llama.cpp/results"
mkdir -p "$out"
# The context of each depth (random tokens) is prefilled once by stock llama.cpp and its
# state kept here; every mode, on every later run, decodes from a copy of that state.
export KVSIEVE_BENCH_STATE_DIR="${KVSIEVE_BENCH_STATE_DIR:-$root/target/llama.cpp/state}"
mkdir -p "$KVSIEVE_BENCH_STATE_DIR"

for d in ${depths//,/ }; do
  b=$((d / 8))   # the 1/8 budget in tokens
  modes="stock-fa;stock-nofa;dense"
  modes+=";sinks=4,window=$((b - 4))"
  modes+=";sinks=4,window=64,pages=$((b - 68))"
  modes+=";sinks=4,window=64,clusters=$((b - 68)),cluster_size=32,rank=mixed"
  f="$out/bench-$d.jsonl"
  {
    echo "{\"uptime_before\":\"$(uptime)\"}"
    "$bin/llama-kvsieve-eval" bench -m "$model" -t 2 --depths "$d" --modes "$modes" -n "$n" -r "$r"
    echo "{\"uptime_after\":\"$(uptime)\"}"
  } | tee "$f"
done

files=()
for d in ${depths//,/ }; do files+=("$out/bench-$d.jsonl"); done
py="$root/.venv/bin/python"
[ -x "$py" ] || py=python3
"$py" -c "import matplotlib" 2>/dev/null || "$py" -m pip install -q matplotlib
"$py" "$here/plot.py" "${files[@]}" --out "$here/speed.png" --table
