#!/usr/bin/env bash
# All benchmarks; each prints a table with its baseline and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
for b in benchmarks/*.py; do
  # llama.cpp against persllm builds llama-server first (10+ minutes): `make bench-engines`.
  [ "$b" = benchmarks/engines.py ] && continue
  echo "== $b"
  python "$b"
done
