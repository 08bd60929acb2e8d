#!/usr/bin/env bash
# Figures: builds release benches, the wheel and the peer (ggml's CPU flash attention from the
# pinned llama.cpp source, scripts/build-ggml-peer.sh), measures, prints a table and writes
# target/bench/report.json (a flat JSON object of named figures). A few minutes on 2 cores
# (the first run also builds ggml: about 2 minutes more).
#   --quick     smaller contexts and shapes, no prefill (a smoke run; figures not comparable)
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=32768
quick=()
report=()
if [ "${1:-}" = "--quick" ]; then tokens=4096; quick=(--quick); report=(--no-prefill); fi

# faiss-cpu: the peer K-means that benches/kmeans.rs compares against.
bash scripts/setup.sh faiss-cpu
mkdir -p target/bench
echo "== building"
cargo build --release --benches -q
bash scripts/build-wheel.sh --release
ggml_fa=$(bash scripts/build-ggml-peer.sh | tail -n 1)

rm -f target/bench/*.json
echo "== dense and sparse decode against memory bandwidth and ggml's flash attention, GemFilter select, prefill against sgemm"
cargo bench -q --bench report -- --tokens "$tokens" --ggml-fa "$ggml_fa" "${report[@]}" --json target/bench/decode.json
echo "== K-means against faiss-cpu, centroid retrieval recall, hierarchical lookup (Rust + Python)"
cargo bench -q --bench kmeans -- "${quick[@]}" --json target/bench/kmeans.json
echo "== dense decode against numpy (Python binding, one process)"
# numpy at its best: without the OpenBLAS core-type override this machine sets for old builds.
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benches/decode_numpy.py --tokens "$tokens" --json target/bench/numpy.json

.venv/bin/python - <<'PY'
import json, glob
report = {}
for path in sorted(glob.glob("target/bench/*.json")):
    if path.endswith("report.json") or path.endswith("_raw.json"):
        continue
    report.update(json.load(open(path)))
json.dump(report, open("target/bench/report.json", "w"), indent=2, sort_keys=True)
# (figure, comparison, target) from the issues that ask for each figure
targets = {
    "decode_dense_bw_fraction": (">=", 0.7),
    "decode_dense_bw_fraction_b1": (">=", 0.7),
    "decode_vs_numpy": (">=", 3.0),
    "decode_sparse_speedup_128k": (">=", 25.0),
    "selection_overhead_fraction": ("<=", 0.25),
    "decode_pre_rope_vs_post_rope": ("<=", 1.2),
    "gemfilter_vs_dense_decode_128k": ("<=", 1.5),
    "kmeans_time_vs_faiss": ("<=", 0.9),
    "kmeans_inertia_vs_faiss": ("<=", 1.01),
    "hier_lookup_fraction": ("<=", 0.25),
    "decode_vs_ggml_fa": ("<=", 0.4),
    "decode_vs_ggml_fa_llama_layout": ("<=", 0.15),
}
print("\n%-34s %12s %10s" % ("figure", "value", "target"))
for k in sorted(report):
    t = targets.get(k)
    if t is None:
        mark = ""
    else:
        op, goal = t
        ok = report[k] >= goal if op == ">=" else report[k] <= goal
        mark = "%s %g %s" % (op, goal, "met" if ok else "MISSED")
    print("%-34s %12.4g %s" % (k, report[k], mark))
print("\nwritten: target/bench/report.json")
PY
