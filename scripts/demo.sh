#!/usr/bin/env bash
# The whole pipeline on the Harry Potter example, offline, with the embedded model.
# Run through `make demo` (which installs everything first). Output goes to $DEMO_DIR (default demo/).
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-demo}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

rm -rf "$DEMO_DIR"
step "persllm init $DEMO_DIR --example harry"
persllm init "$DEMO_DIR" --example harry
cd "$DEMO_DIR"

end=$(date +%s)
step "demo finished in $((end - start)) s; project in $DEMO_DIR/"
