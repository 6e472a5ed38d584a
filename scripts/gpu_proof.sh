#!/usr/bin/env bash
# The GPU proof of the training path in one command, for a device session. Prepare it here with
# `bash scripts/gpu_prepare.sh`, then: run(command="bash scripts/gpu_proof.sh", carry=[".whl", ".gpu"],
# timeout_s=510). Runs from the repo root and writes everything under $OUT:
#   summary.txt     one line per step and check (PASS / FAIL / SKIP), then the figures
#   nvidia-smi.log, install.log, versions.log + versions.json
#   bench.log, gpu.json   benchmarks/train_throughput.py's GPU part: qlora_baseline.py's loop and
#                   persllm's path in the same run, SIZES 0.5B,7B x qlora, lora-bf16
#   cli.log, run-*.json, chat.txt   the CLI on the device: init, dedup, split, dpo, tokenize for a tiny
#                   random Llama with the carried SmolLM2 tokenizer, train (QLoRA SFT, QLoRA SFT+DPO,
#                   bf16 SFT), chat --prompt
#   pytest-gpu.log  pytest -m gpu, when gpu-marked tests exist
# Each step has a timeout, and the whole script stops after GPU_PROOF_BUDGET_S seconds (450).
# For a second, partial run on a still-warm machine: GPU_PROOF_STEPS (default bench,cli,pytest) and
# GPU_PROOF_SIZES (default 0.5B,7B), e.g. GPU_PROOF_STEPS=bench GPU_PROOF_SIZES=7B.
# GPU_PROOF_DEVICE=cpu runs the same steps on CPU with a tiny benchmark size, to check the script
# where there is no GPU (PYTHON names the interpreter; the wheels are then only test-installed).
set -uo pipefail  # no -e: a failed step is recorded and the next one still runs
cd "$(dirname "$0")/.."
REPO=$PWD
DEVICE="${GPU_PROOF_DEVICE:-cuda}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_PROOF_BUDGET_S:-450}"
STEPS=",${GPU_PROOF_STEPS:-bench,cli,pytest},"
START=$(date +%s)
OUT="${OUT:-$(mktemp -d /tmp/gpu_proof_out.XXXXXX)}"
WORK=$(mktemp -d /tmp/gpu_proof.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PY DEVICE REPO WORK OUT SUMMARY
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PERSLLM_HOME="$WORK/home"
if [ "$DEVICE" = cpu ]; then
  # One thread: on a small shared CPU, threads that wait for each other make each step 5x slower.
  export OMP_NUM_THREADS=1 PERSLLM_CPU_QLORA=1 CUDA_VISIBLE_DEVICES=""
elif [ "$DEVICE" != cuda ]; then
  echo "GPU_PROOF_DEVICE must be cuda or cpu" >&2
  exit 2
fi

note() { echo "$*" | tee -a "$SUMMARY" >&2; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
export -f note

# step NAME CAP CMD: CMD (a command line or one of the functions below, run by bash -c) under a
# timeout of min(CAP, time left); its output goes to $OUT/NAME.log.
step() {
  local name=$1 cap=$2 cmd=$3 t s rc
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 15 ]; then
    note "SKIP  $name: out of time"
    return 1
  fi
  s=$(date +%s)
  echo "==> $name (at most ${t}s)" >&2
  timeout -k 5 "$t" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  s=$(($(date +%s) - s))
  if [ $rc -eq 0 ]; then
    note "PASS  $name (${s}s)"
  else
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "FAIL  $name: timed out after ${s}s"; else note "FAIL  $name: exit $rc after ${s}s"; fi
    tail -n 25 "$OUT/$name.log" | sed 's/^/      /' >&2
  fi
  return $rc
}

# ------------------------------------------------------------------------------- the steps

install_wheels() {
  # The device: the README's recipe. Here (CPU check): install for Python 3.12 into a folder that is
  # not used, which proves the carried wheels are complete and installable.
  local target=(--target "$WORK/site") check=()
  [ "$DEVICE" = cpu ] && check=(--python-version 3.12 --implementation cp --only-binary=:all:
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)
  "$PY" -m pip install -q --no-index --no-deps --no-compile "${target[@]}" "${check[@]}" .whl/*.whl || return 1
  for pkg in matplotlib pytest; do
    if [ "$DEVICE" = cuda ] && "$PY" -c "import $pkg" 2>/dev/null; then
      echo "$pkg: on the image"
    elif compgen -G ".whl/extra-$pkg/*.whl" > /dev/null; then
      echo "$pkg: installing .whl/extra-$pkg/"
      "$PY" -m pip install -q --no-index --no-deps --no-compile "${target[@]}" "${check[@]}" ".whl/extra-$pkg/"*.whl || return 1
    else
      echo "$pkg: neither on the image nor carried"
    fi
  done
  ls "$WORK/site"
}

versions() {
  "$PY" - <<'PY'
import importlib, json, os, sys

import torch

res = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    res.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
needed = ["transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "matplotlib", "sklearn",
          "typer", "rich", "persllm_cli"]
missing = []
for name in needed + ["pytest", "pandas", "xxhash", "dill", "multiprocess", "pyarrow", "liger_kernel"]:
    try:
        m = importlib.import_module(name)
        res[name] = f"{getattr(m, '__version__', '?')} ({os.path.dirname(m.__file__)})"
    except Exception as e:
        res[name] = f"missing: {type(e).__name__}: {str(e)[:150]}"
        missing += [name] if name in needed else []
if torch.cuda.is_available() and "missing" not in res["bitsandbytes"]:
    try:  # bitsandbytes found its CUDA library: one 4-bit round trip on the GPU
        import bitsandbytes.functional as F

        w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        q, state = F.quantize_4bit(w, quant_type="nf4")
        res["bnb_nf4_roundtrip_max_err"] = round(float((F.dequantize_4bit(q, state) - w).abs().max()), 3)
    except Exception as e:
        res["bnb_nf4_roundtrip_max_err"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        missing.append("bitsandbytes on CUDA")
json.dump(res, open(os.path.join(os.environ["OUT"], "versions.json"), "w"), indent=1)
print(json.dumps(res, indent=1))
if missing or (os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available()):
    sys.exit(f"missing: {', '.join(missing) or 'CUDA'}")
PY
}

bench() {
  if [ "$DEVICE" = cuda ]; then
    env SIZES="${GPU_PROOF_SIZES:-0.5B,7B}" MODES=qlora,lora-bf16 \
      "$PY" benchmarks/train_throughput.py --gpu-only --device cuda --json "$OUT/gpu.json"
  else
    env SIZES=tiny MODES=qlora,lora-bf16 \
      "$PY" benchmarks/train_throughput.py --gpu-only --device cpu --gpu-steps 4 --seq-len 64 --json "$OUT/gpu.json"
  fi
}

cli_path() {
  set -e
  cd "$WORK"
  persllm() { echo "+ persllm $*" >&2; "$PY" -m persllm_cli "$@"; }
  sub() {  # NAME CMD...: one check of the CLI path, noted in the summary
    local name=$1
    shift
    if "$@"; then note "PASS    cli: $name"; else local rc=$?; note "FAIL    cli: $name (exit $rc)"; return $rc; fi
  }
  check_run() {  # RUN QUANTIZED: run.json is complete, on this device, (not) 4-bit as asked
    cp "$1/run.json" "$OUT/run-$(basename "$1").json"
    "$PY" - "$1" "$2" <<'PY'
import json, os, sys

info = json.load(open(os.path.join(sys.argv[1], "run.json")))
hw = info["hardware"]
print(f"  {sys.argv[1]}: complete={info['complete']} device={hw['device']} quantized={hw['quantized']} "
      f"dtype={hw['dtype']} steps={info['steps']} loss={info['final_loss']} tok/s={info['tokens_per_second']} "
      f"peak={info['peak_memory_gb']} GB ({hw['summary']})")
ok = info["complete"] and hw["device"] == os.environ["DEVICE"] and hw["quantized"] is (sys.argv[2] == "true")
sys.exit(0 if ok else 1)
PY
  }
  echo "+ tiny random Llama with the carried SmolLM2 tokenizer" >&2
  "$PY" - <<'PY'
import os

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

tok = AutoTokenizer.from_pretrained(os.path.join(os.environ["REPO"], ".gpu", "tokenizer"))
# Widths divisible by 64, bitsandbytes' 4-bit block size.
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained("tiny-base")
tok.save_pretrained("tiny-base")
PY
  # CPU check: smaller batches (the defaults, 4 x 4 conversations a step, are for the GPU).
  local small=()
  [ "$DEVICE" = cpu ] && small=(--batch-size 2 --grad-accum 1)
  persllm init proj --example harry
  cd proj
  mkdir -p build
  cp annotations.sample.jsonl build/annotations.jsonl
  persllm dedup
  persllm split --seed 0
  persllm dpo --skip 1
  sub "tokenize --base tiny-base" persllm tokenize --base "$WORK/tiny-base" --max-length 512
  sub "train --qlora (SFT, 4 steps)" persllm train --max-steps 4 --qlora "${small[@]}" --output runs/qlora
  sub "run.json: complete, device $DEVICE, quantized" check_run runs/qlora true
  sub "chat --prompt" persllm chat runs/qlora --max-new-tokens 16 --temperature 0 --prompt "Where do you live?" \
    > "$OUT/chat.txt"
  echo "  answer (random weights, so any text or none): $(head -c 200 "$OUT/chat.txt")" >&2
  set +e  # the rest are extra checks: each is noted, none stops the others
  sub "train --qlora --method sft+dpo (2 steps each)" \
    persllm train --method sft+dpo --max-steps 2 --qlora "${small[@]}" --output runs/qlora-dpo \
    && sub "run.json (sft+dpo): complete, quantized" check_run runs/qlora-dpo true
  sub "train --no-qlora (2 steps)" persllm train --max-steps 2 --no-qlora "${small[@]}" --output runs/lora \
    && sub "run.json (--no-qlora): complete, not quantized" check_run runs/lora false
  grep -q '^FAIL    cli' "$SUMMARY" && return 1
  return 0
}

gpu_tests() {
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
}

figures() {  # gpu.json as lines for the summary
  "$PY" - <<'PY'
import json, os

path = os.path.join(os.environ["OUT"], "gpu.json")
if not os.path.exists(path):
    print("no gpu.json")
    raise SystemExit
gpu = json.load(open(path)).get("gpu", {})
print(f"{gpu.get('device')}: batch {gpu.get('batch')} x {gpu.get('seq_len')} tokens, {gpu.get('timed_steps')} timed "
      f"steps of {gpu.get('steps')}; tok/s and peak GiB (torch.cuda.max_memory_allocated)")


def side(d):
    return d["error"][:90] if "error" in d else f"{d['tokens_per_second']:>9,.0f} tok/s {d['peak_gib']} GiB"


for key, row in gpu.get("results", {}).items():
    ref = row.get("h100_reference")
    print(f"  {key:16} baseline {side(row['baseline'])} | persllm {side(row['persllm'])} | ratio {row.get('ratio', '-')}"
          + (f" | H100 reference {ref['tokens_per_second']:,} tok/s {ref['peak_gib']} GiB" if ref else ""))
PY
}

export -f install_wheels versions bench cli_path gpu_tests

# --------------------------------------------------------------------------------- the run

# The device gets a copy of the working tree without .git: gpu_prepare.sh wrote down the commit.
commit=$(git rev-parse --short HEAD 2>/dev/null || cat .gpu/commit 2>/dev/null || echo unknown)
note "gpu_proof on $DEVICE, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, commit $commit"
if [ "$DEVICE" = cuda ]; then
  step nvidia-smi 20 nvidia-smi
else
  note "SKIP  nvidia-smi: CPU check"
fi
step install 90 install_wheels
if [ "$DEVICE" = cuda ]; then
  export PYTHONPATH="$WORK/site:$REPO"
else
  export PYTHONPATH="$REPO"
fi
step versions 60 versions
# The benchmark gets all but ~2 minutes, which the CLI path keeps; gpu.json is rewritten after each
# size/mode, so a cut run still leaves what it measured.
reserve=0
[[ $STEPS == *,cli,* ]] && reserve=130
[[ $STEPS == *,bench,* ]] && step bench $(($(left) - reserve)) bench
[[ $STEPS == *,cli,* ]] && step cli 180 cli_path
if [[ $STEPS == *,pytest,* ]]; then
  if grep -rqE 'mark\.gpu' tests; then step pytest-gpu 120 gpu_tests; else note "SKIP  pytest -m gpu: no gpu-marked tests"; fi
fi
note ""
figures | tee -a "$SUMMARY" >&2
note "done in $(($(date +%s) - START))s; files in $OUT"
echo
cat "$SUMMARY"
! grep -q '^FAIL' "$SUMMARY"
