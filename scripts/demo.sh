#!/usr/bin/env bash
# The whole pipeline on the Harry Potter example, offline, with the embedded model (smollm2-135m).
# Run through `make demo`, which installs everything first. The project lands in $DEMO_DIR
# (default demo/); PERSLLM_HOME defaults to ~/.cache/persllm as usual.
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-demo}"
STEPS="${STEPS:-10}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
step() { printf '\n==> %s\n' "$*" >&2; }
# Exit 3 means "some items failed after retries" (rerun to retry them): fine for a demo.
partial_ok() { "$@" || { rc=$?; [ "$rc" -eq 3 ] || exit "$rc"; echo "(exit 3: some items failed; a rerun retries them)" >&2; }; }

rm -rf "$DEMO_DIR"
step "persllm init $DEMO_DIR --example harry"
persllm init "$DEMO_DIR" --example harry
cd "$DEMO_DIR"

step "hand-written sample (66 records, no API key needed) -> build/annotations.jsonl"
mkdir -p build
cp annotations.sample.jsonl build/annotations.jsonl

step "persllm annotate --backend local --limit 3 (the embedded 135M model writes a few more records)"
# Small context budgets keep prompts short for a CPU; an API model would use the defaults (1500/500).
PERSLLM_ANNOTATE_KNOWLEDGE_WORDS=300 PERSLLM_ANNOTATE_STYLE_WORDS=100 PERSLLM_ANNOTATE_MAX_TOKENS=96 \
  partial_ok persllm annotate --backend local --limit 3 --pattern ordinary --concurrency 1 --max-retries 1

step "persllm dedup"
persllm dedup

step "persllm split --test-size 0.2 --seed 0"
persllm split --test-size 0.2 --seed 0

step "persllm dpo (rejected answers from other stages)"
persllm dpo --skip 1

step "persllm tokenize --base smollm2-135m --time-tokens 3 --general general.jsonl --repeat 2"
persllm tokenize --base smollm2-135m --time-tokens 3 --general general.jsonl --repeat 2 --max-length 512

step "persllm train --method sft+dpo --max-steps $STEPS (SFT, then DPO from the SFT adapter; CPU: LoRA in float32)"
persllm train --method sft+dpo --max-steps "$STEPS" --batch-size 2 --grad-accum 1 --output runs/demo

ask() {  # stage, question
  step "persllm chat --stage $1 --prompt '$2'"
  persllm chat --stage "$1" --max-new-tokens 60 --prompt "$2"
}
ask early "What was it like to see Hogwarts for the first time?"
ask middle "What do you think of Professor Umbridge?"
ask late "What do you do for a living now?"

step "persllm converse .@early .@late (young and old Harry talk; transcript in build/converse.md)"
persllm converse .@early .@late --turns 6 --max-new-tokens 60 --seed 0 \
  --scene "Harry, eleven and just sorted into Gryffindor, meets his older self, an Auror after the war, in the Gryffindor common room late at night. The young one speaks first."

step "persllm eval (answers the held-out test questions; BLEU within and across stages, and against the references)"
persllm eval --max-new-tokens 48

end=$(date +%s)
step "demo finished in $((end - start)) s"
cat >&2 <<TXT
Where everything went (in $DEMO_DIR/):
  persllm.toml, data/<stage>/{knowledge,style}.txt   the project
  build/annotations.jsonl  -> dedup.jsonl -> train.jsonl / test.jsonl, dpo.jsonl  (each with .meta.json)
  build/tokenized/         token ids, label masks, tokenizer with <TIME-I..III>, stats.json
  runs/demo/               adapter/, tokenizer/, metrics.jsonl, loss.png, run.json, README.md
  runs/demo/eval/          answers.jsonl, eval.md, eval.png, eval.json
  build/converse.jsonl     young and old Harry talking (and build/converse.md)
  runs/latest -> demo
Talk to it:  cd $DEMO_DIR && persllm chat --stage early
TXT
