#!/usr/bin/env bash
# Prepare a device session for scripts/gpu_proof.sh (run here, where PyPI is reachable; the device
# machine has no internet):
#   .whl/          wheels the device image lacks (bitsandbytes, trl, datasets, dill, multiprocess),
#                  always installed there; .whl/extra-*/ only installed when the image lacks them
#   .gpu/tokenizer the embedded SmolLM2 tokenizer (the model itself is too big to carry), for the
#                  tiny random model the CLI path trains there
# then checks that what travels fits the 64 MiB carry limit and prints the device call.
# PYTHON picks the interpreter (default .venv/bin/python, else python3). Both folders are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
LIMIT=$((64 * 1024 * 1024))

# The device image: Python 3.12 on x86_64 Linux (shared/gpu/README.md). Versions as tested here.
fetch() {  # dest, packages...
  local dest=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}
echo "==> wheels into .whl/" >&2
fetch .whl bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# Only installed on the device when the import fails there: `persllm train` draws loss.png with
# matplotlib (not listed on the image); pytest runs the gpu-marked tests.
fetch .whl/extra-matplotlib matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 kiwisolver==1.5.1 \
  pyparsing==3.3.3 python-dateutil==4.0.0 six
fetch .whl/extra-pytest pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
# fonttools has a pure-Python wheel, a quarter of the size of the compiled one.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
  -d .whl/extra-matplotlib fonttools==4.68.0 2>/dev/null \
  || fetch .whl/extra-matplotlib fonttools==4.68.0

echo "==> SmolLM2 tokenizer into .gpu/tokenizer/ (converts the embedded model under PERSLLM_HOME once)" >&2
rm -rf .gpu/tokenizer
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PY'
from transformers import AutoTokenizer

from persllm_cli.model.bases import ensure_embedded

AutoTokenizer.from_pretrained(ensure_embedded("smollm2-135m")).save_pretrained(".gpu/tokenizer")
PY

# The commit the proof runs (with "+changes" when the tree differs from it): the device copy has no .git.
echo "$(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo +changes)" > .gpu/commit

echo "==> what travels" >&2
du -sh .whl/*.whl .whl/extra-* .gpu/tokenizer | sed 's/^/  /' >&2
carry=$(du -sb .whl .gpu | awk '{s += $1} END {print s}')
tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((carry + tree))
awk -v c="$carry" -v t="$tree" -v l="$LIMIT" 'BEGIN {
  printf "  carry (.whl + .gpu) %.1f MiB + working tree %.1f MiB = %.1f MiB of %d MiB\n", c / 2^20, t / 2^20, (c + t) / 2^20, l / 2^20
}' >&2
if [ "$total" -gt "$LIMIT" ]; then
  echo "over the carry limit: drop .whl/extra-pytest first (no gpu-marked tests need it yet); without" \
       ".whl/extra-matplotlib, an image lacking matplotlib fails \`persllm train\` at loss.png" >&2
  exit 1
fi

cat <<'TXT'

Device call (one run; the script stops itself after GPU_PROOF_BUDGET_S=450 s, results in $OUT):
  run(command="bash scripts/gpu_proof.sh", carry=[".whl", ".gpu"], timeout_s=510)
Then read summary.txt, gpu.json and the *.log files under files_at; call give_back unless rerunning at once.
TXT
