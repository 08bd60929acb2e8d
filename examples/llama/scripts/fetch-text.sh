#!/usr/bin/env bash
# Writes the King James Bible (public domain, Debian's bible-kjv-text read through the
# `bible` program of bible-kjv) as plain text, one verse per line, to
# ~/.cache/kvsieve/kjv.txt and prints the path. Installs the packages with apt-get when
# missing. Idempotent. The text is never committed to the repository.
set -euo pipefail
cache="${KVSIEVE_CACHE:-$HOME/.cache/kvsieve}"
out="$cache/kjv.txt"
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
if ! command -v bible >/dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv bible-kjv-text >&2
fi
mkdir -p "$cache"
COLUMNS=100000 bible -f "Ge1:1-Re22:21" | sed -E -n 's/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ //p' > "$out.part"
mv "$out.part" "$out"
echo "$out"
