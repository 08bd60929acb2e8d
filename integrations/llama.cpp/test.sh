#!/usr/bin/env bash
# Short correctness check of llama.cpp with attention through kvsieve, self-contained:
# builds the patched llama.cpp (llama-perplexity and the evaluation tool only) against the
# installed kvsieve prefix, fetches SmolLM2-135M-Instruct and the KJV text, then with one
# binary compares
#   1. perplexity over 512 tokens of the KJV, stock attention vs kvsieve dense (prefill
#      through kvsieve): must agree within 0.1%;
#   2. the next-token top-5 after "The capital of France is", the prompt decoded token by
#      token (kvsieve's decode path): same tokens, probabilities within 0.002.
# Both run with f32 K/V caches and stock without flash attention, the stock path whose
# attention arithmetic is f32 like kvsieve's (see README.md, "Correctness").
#
# Usage: integrations/llama.cpp/test.sh [--kvsieve-prefix DIR]
#   (default: scripts/install.sh --prefix target/kvsieve-prefix first, from this checkout)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
start=$(date +%s)

# kvsieve from the given prefix, or installed from this checkout into target/kvsieve-prefix
if [ $# -eq 0 ]; then
  bash "$root/scripts/install.sh" --prefix "$root/target/kvsieve-prefix" >&2
fi
bin=$(bash "$here/build.sh" --targets llama-perplexity "$@" | tail -n 1)
model=$(bash "$root/scripts/fetch-model.sh")
kjv=$(bash "$root/examples/llama/scripts/fetch-text.sh")
text="$root/target/llama.cpp/kjv-head.txt"
head -c 20000 "$kjv" > "$text"

common=(-m "$model" -t 2 -ctk f32 -ctv f32)

ppl() { # mode -> final perplexity
  local out
  out=$(LLAMA_KVSIEVE="$1" LLAMA_KVSIEVE_PREFILL=kvsieve "$bin/llama-perplexity" "${common[@]}" -fa off \
        -f "$text" -c 512 --chunks 1 2>&1) || { echo "$out" >&2; return 1; }
  echo "$out" | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p'
}
stock=$(ppl "")
dense=$(ppl dense)
echo "perplexity (512 KJV tokens, f32 K/V): stock $stock, kvsieve dense $dense"

top() { # mode -> JSON line
  LLAMA_KVSIEVE_PREFILL=kvsieve "$bin/llama-kvsieve-eval" top -m "$model" -t 2 --kv f32 --fa off --mode "$1" --one-by-one
}
top_stock=$(top stock)
top_dense=$(top dense)
echo "top-5 stock:  $top_stock"
echo "top-5 kvsieve: $top_dense"

python3 - "$stock" "$dense" "$top_stock" "$top_dense" <<'PY'
import json, sys
stock, dense = float(sys.argv[1]), float(sys.argv[2])
rel = abs(dense - stock) / stock
ok = rel <= 1e-3
print(f"perplexity: relative difference {rel:.5f} (limit 0.001): {'ok' if ok else 'FAIL'}")
a, b = json.loads(sys.argv[3]), json.loads(sys.argv[4])
dp = max(abs(x - y) for x, y in zip(a["probs"], b["probs"]))
ok_top = a["tokens"] == b["tokens"] and dp <= 0.002
print(f"top-5: same tokens {a['tokens'] == b['tokens']}, largest probability difference {dp:.6f} (limit 0.002): {'ok' if ok_top else 'FAIL'}")
sys.exit(0 if ok and ok_top else 1)
PY
echo "integrations/llama.cpp/test.sh: passed in $(( $(date +%s) - start )) s"
