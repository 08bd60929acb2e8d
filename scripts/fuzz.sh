#!/usr/bin/env bash
# Runs kvsieve's seeded random drivers (fuzz/): the policy text parser, the cluster index
# file loader (mutated files, checksums recomputed so the loader's own checks are reached),
# selections from CSR arrays, and the C ABI as random call sequences checked against a model.
# Inputs that crash, hang or get a wrong answer are kept under fuzz/regressions/ (replayed
# by `cargo test -p kvsieve-fuzz`) and fail the run.
#
#   bash scripts/fuzz.sh                  1 minute in all
#   bash scripts/fuzz.sh --minutes 60     an hour, split evenly between the drivers
#   bash scripts/fuzz.sh --seconds 90 --seed 7 policy file
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) args+=(--seconds "$(( $2 * 60 ))"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
cargo build -q --release -p kvsieve-fuzz
exec target/release/kvsieve-fuzz "${args[@]}"
