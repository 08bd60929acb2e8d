#!/usr/bin/env bash
# Figures: builds release benches and the wheel, measures, prints a table and writes
# target/bench/report.json (a flat JSON object of named figures). Under 10 minutes on 2 cores.
#   --quick     smaller contexts (for a smoke run; figures not comparable)
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=32768
[ "${1:-}" = "--quick" ] && tokens=4096

bash scripts/setup.sh
mkdir -p target/bench
echo "== building"
cargo build --release --benches -q
bash scripts/build-wheel.sh --release

echo "== dense decode against memory bandwidth (Rust, one process)"
cargo bench -q --bench report -- --tokens "$tokens" --json target/bench/decode.json
echo "== dense decode against numpy (Python binding, one process)"
# numpy at its best: without the OpenBLAS core-type override this machine sets for old builds.
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benches/decode_numpy.py --tokens "$tokens" --json target/bench/numpy.json

.venv/bin/python - <<'PY'
import json, glob
report = {}
for path in sorted(glob.glob("target/bench/*.json")):
    if path.endswith("report.json"):
        continue
    report.update(json.load(open(path)))
json.dump(report, open("target/bench/report.json", "w"), indent=2, sort_keys=True)
targets = {"decode_dense_bw_fraction": 0.7, "decode_vs_numpy": 3.0}
print("\n%-34s %12s %10s" % ("figure", "value", "target"))
for k in sorted(report):
    t = targets.get(k)
    mark = "" if t is None else (">= %g %s" % (t, "met" if report[k] >= t else "MISSED"))
    print("%-34s %12.4g %s" % (k, report[k], mark))
print("\nwritten: target/bench/report.json")
PY
