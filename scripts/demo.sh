#!/usr/bin/env bash
# The whole pipeline on the Harry Potter example, offline, with the embedded model (smollm2-135m).
# Run through `make demo`, which installs everything first. The project lands in $DEMO_DIR
# (default demo/); PERSLLM_HOME defaults to ~/.cache/persllm as usual.
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-demo}"
STEPS="${STEPS:-10}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
last=$start
# Each step says how long the one before took, and the load average (the box may be shared).
step() {
  now=$(date +%s)
  [ -n "${started_one:-}" ] && printf '(%s s; load average %s)\n' "$((now - last))" "$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo ?)" >&2
  last=$now started_one=1
  printf '\n==> %s\n' "$*" >&2
}
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
# Greedy (temperature 0), so every demo trains on the same records and ends with the same model.
PERSLLM_ANNOTATE_KNOWLEDGE_WORDS=300 PERSLLM_ANNOTATE_STYLE_WORDS=100 PERSLLM_ANNOTATE_MAX_TOKENS=96 \
  PERSLLM_ANNOTATE_TEMPERATURE=0 partial_ok persllm annotate --backend local --limit 3 --pattern ordinary --concurrency 1 --max-retries 1

step "persllm annotate --batch-file (the same requests as one file for the OpenAI Batch API or vllm run-batch; nothing sent)"
persllm annotate --limit 4 --batch-file build/requests.jsonl

step "persllm dedup"
persllm dedup

step "persllm split --test-size 0.2 --seed 0"
persllm split --test-size 0.2 --seed 0

step "persllm dpo (rejected answers from other stages)"
persllm dpo --skip 1

step "persllm tokenize --base smollm2-135m --time-tokens 3 --general general.jsonl --repeat 2"
persllm tokenize --base smollm2-135m --time-tokens 3 --general general.jsonl --repeat 2 --max-length 512

step "persllm train --method sft+dpo --max-steps $STEPS --learning-rate 1e-3 (SFT, then DPO from the SFT adapter; CPU: LoRA in float32)"
# A 135M model and ten steps: at the default LoRA rate (2e-4, for real runs) it still answers as a
# chatbot ("as an AI, I don't have memories"); at 1e-3 it answers in the first person. The time-token
# rows start from each stage's meaning and learn at their own rate (--time-token-learning-rate).
persllm train --method sft+dpo --max-steps "$STEPS" --learning-rate 1e-3 --batch-size 2 --grad-accum 1 --output runs/demo

step "persllm chat --stage early --prompt 'What was it like to see Hogwarts for the first time?' (the other stages answer through serve below)"
persllm chat --stage early --max-new-tokens 60 --prompt "What was it like to see Hogwarts for the first time?"

step "persllm converse .@early .@late (young and old Harry talk; transcript in build/converse.md)"
persllm converse .@early .@late --turns 6 --max-new-tokens 60 --seed 0 \
  --scene "Harry, eleven and just sorted into Gryffindor, meets his older self, an Auror after the war, in the Gryffindor common room late at night. The young one speaks first."

step "persllm export --format hf (merged safetensors; loaded back with plain transformers and compared with the run)"
persllm export --format hf -o export/hf --force
step "persllm export --format ollama --no-check (a GGUF with the time tokens, and one Modelfile per stage)"
persllm export --format ollama -o export/ollama --force --no-check
ls -l export/ollama >&2
step "persllm export --format card (one chara_card_v2 per stage, JSON and PNG, naming the model demo@STAGE for a chat front-end)"
persllm export --format card -o export/cards --force
ls export/cards >&2

step "persllm serve (OpenAI-compatible API and chat page), asked at two stages with the openai client, then stopped with SIGTERM"
persllm serve --port 0 2> build/serve.log &
server=$!
for _ in $(seq 1 600); do grep -q "Listening on" build/serve.log && break; kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
url=$(grep -o 'http://[^ ]*' build/serve.log | head -1)
python - "$url" <<'PY'
import sys
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
print("models:", ", ".join(m.id for m in client.models.list().data), file=sys.stderr)
for model, question in (("demo@middle", "What do you think of Professor Umbridge?"),
                        ("demo@late", "What do you do for a living now?")):
    # Greedy; OpenAI's frequency_penalty keeps a 135M model's answer from going round in a loop.
    reply = client.chat.completions.create(model=model, max_tokens=60, temperature=0, frequency_penalty=0.5,
                                           messages=[{"role": "user", "content": question}])
    print(f"{model}: {question}\n  {reply.choices[0].message.content}\n  ({reply.usage.completion_tokens} tokens)",
          file=sys.stderr)
PY
kill -TERM "$server"; wait "$server"
cat build/serve.log >&2

step "persllm eval (the held-out questions, and each asked again at the other stages; stage fidelity without a judge, BLEU)"
# A model this small and this briefly trained may end an answer before its first word; eval counts
# such questions as unanswered and exits 3, which the demo reports and goes past.
partial_ok persllm eval --max-new-tokens 48

step "persllm train --adapter-per-stage --max-steps 4 (one adapter per stage, each on its own stage's examples), and its stages talking"
# The stage is picked by the adapter as well as the time token. Each stage gets its share of the
# steps (2 each here: a look at the command, not a trained persona; RESULTS.md has it at 70 steps).
persllm train --adapter-per-stage --max-steps 4 --learning-rate 1e-3 --batch-size 2 --grad-accum 1 --output runs/demo-stages
persllm converse runs/demo-stages@early runs/demo-stages@late --turns 2 --max-new-tokens 40 --seed 0 \
  -o build/converse-stages.jsonl \
  --scene "Harry, eleven, meets his older self, an Auror after the war, in the Gryffindor common room late at night. The young one speaks first."
step "persllm export runs/demo-stages --format ollama --no-check (every stage: one base GGUF, a LoRA GGUF and a Modelfile per stage)"
persllm export runs/demo-stages --format ollama -o export/stages --force --no-check
ls -l export/stages >&2

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
  export/hf/               the run merged into its base, chat template with the stage (transformers, vLLM)
  export/ollama/           the same as a GGUF file, with Modelfile.<stage> for Ollama
  runs/demo-stages/        one adapter per stage: stages/<stage>/ each a run of its own
  build/converse-stages.jsonl  its young and old stage talking, each with its own adapter
  export/stages/           its base GGUF with every stage's time token, a LoRA GGUF per stage, Modelfile.<stage>
  runs/latest -> demo-stages
Talk to it:  cd $DEMO_DIR && persllm chat --stage early
Serve it:    cd $DEMO_DIR && persllm serve    (then open http://127.0.0.1:8000/)
TXT
