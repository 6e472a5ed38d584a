#!/usr/bin/env bash
# All benchmarks; each prints a table with its baseline and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
for b in benchmarks/*.py; do
  echo "== $b"
  python "$b"
done
