"""llama.cpp itself on a run with one adapter per stage exported whole: one base GGUF and a LoRA GGUF
per stage, each stage's adapter applied per request, against persllm's own answers.

    python benchmarks/engines_stages.py [RUN] [--tokens 32] [--json FILE]

RUN: a run trained with `persllm train --adapter-per-stage` (default: one built like the tests' per-stage
runs, tests/run_factory.py, with seeded LoRA weights and time-token rows, so that the stages answer
apart). The script exports it as a user would (`persllm export RUN --format gguf -o DIR`, f16, the
export's own check on), builds llama-server from the llama.cpp source `make llama-cpp` unpacks (as
benchmarks/engines.py does; reused after), and starts

    llama-server -m BASE.gguf --jinja --lora-init-without-apply --lora EARLY.gguf --lora MIDDLE.gguf ...

Then for every stage and two prompts:
  prompt   /apply-template with `chat_template_kwargs: {"stage": S}` equals the prompt training renders
  answer   /v1/chat/completions, greedy, with that stage and `"lora": [{"id": i, "scale": 1.0}]` (its
           adapter), against persllm's greedy answer with the stage's adapter (the run as `persllm chat`
           loads it, float32, unmerged): identical, or how many leading tokens agree
  control  the same request with another stage's adapter, and with no adapter: how often the answer
           is then the stage's own (it should not be, or the adapters change nothing)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engines import PROMPTS, LlamaServer, agreeing, llama_server, load  # noqa: E402


def _default_run(work: Path) -> Path:
    """A per-stage run on the embedded model whose stages answer apart (tests/run_factory.py)."""
    from persllm_cli.model import bases
    from tests.run_factory import make_staged_run, perturb_lora

    base = Path(bases.resolve_base("smollm2-135m"))
    run = make_staged_run(work / "runs" / "ps", base)
    for i, sub in enumerate(sorted((run / "stages").iterdir())):
        perturb_lora(sub, seed=100 + i, scale=0.02)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per answer")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()

    import torch

    from persllm_cli.export import check
    from persllm_cli.export.template import stop_ids
    from persllm_cli.model import chat_format, load as loader
    from tests.conftest import run_persllm

    binary, _ = llama_server()

    work = Path(tempfile.mkdtemp(prefix="persllm-engines-stages-"))
    run = args.run.resolve() if args.run else _default_run(work)
    out = work / "export"
    t0 = time.monotonic()
    done = run_persllm("export", str(run), "--format", "gguf", "-o", str(out))
    if done.returncode != 0:
        sys.exit(f"persllm export failed: {done.stderr[-1500:]}")
    print(f"persllm export {run} --format gguf: {time.monotonic() - t0:.0f} s", flush=True)
    print("  " + "\n  ".join(line for line in (done.stdout + done.stderr).splitlines()
                             if line.startswith(("Check passed", "llama.cpp's"))))
    base = next(p for p in out.glob("*.gguf") if not p.name.endswith("-lora.gguf"))

    model, tok, info, names = loader.load_stages(run, device="cpu", dtype="float32")
    stages = info.stages
    loras = [out / f"{base.name.rsplit('-', 1)[0]}-{s['id']}-lora.gguf" for s in stages]
    flags = ["--lora-init-without-apply"] + [x for f in loras for x in ("--lora", str(f))]
    server = LlamaServer(binary, base, None, work / "llama-server.log", *flags)
    eos = stop_ids(tok)
    rows, figures = [], {"prompts_identical": 0, "prompts": 0, "answers_identical": 0, "answers": 0,
                         "agree": 0, "total": 0, "other_adapter_same": 0, "no_adapter_same": 0, "controls": 0}
    try:
        for i, s in enumerate(stages):
            model.set_adapter(names[s["id"]])
            for prompt in PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                kwargs = {"chat_template_kwargs": {"stage": s["id"]}}
                text = server.post("/apply-template", {"messages": messages, **kwargs})["prompt"]
                same_prompt = text == chat_format.build_prompt(tok, messages, s["token"])
                ids = chat_format.prompt_ids(tok, messages, s["token"])
                with torch.inference_mode():
                    want = tok.decode(check.greedy(model, ids, eos, args.tokens), skip_special_tokens=True).strip()

                def ask(lora: list[dict]) -> str:
                    body = {"messages": messages, "max_tokens": args.tokens, "temperature": 0, "repeat_penalty": 1.0,
                            "lora": lora, **kwargs}
                    return server.post("/v1/chat/completions", body)["choices"][0]["message"]["content"].strip()

                answer = ask([{"id": i, "scale": 1.0}])
                other = ask([{"id": (i + 1) % len(stages), "scale": 1.0}])
                bare = ask([])
                agree, total = agreeing(tok, answer, want)
                figures["prompts"] += 1
                figures["prompts_identical"] += int(same_prompt)
                figures["answers"] += 1
                figures["answers_identical"] += int(answer == want)
                figures["agree"] += agree
                figures["total"] += total
                figures["controls"] += 1
                figures["other_adapter_same"] += int(other == want)
                figures["no_adapter_same"] += int(bare == want)
                rows.append({"stage": s["id"], "prompt": prompt, "prompt_same": same_prompt, "persllm": want,
                             "llama_server": answer, "agree": f"{agree}/{total}", "other_adapter": other,
                             "no_adapter": bare})
    finally:
        server.stop()

    print(f"\nllama-server --jinja --lora-init-without-apply --lora x{len(stages)}, f16 (load {load()}):")
    print(f"  prompts identical {figures['prompts_identical']}/{figures['prompts']}; greedy answers identical to "
          f"persllm's {figures['answers_identical']}/{figures['answers']}, leading tokens agreeing "
          f"{figures['agree']}/{figures['total']}")
    print(f"  with another stage's adapter the answer is the stage's own {figures['other_adapter_same']}/{figures['controls']}; "
          f"with no adapter {figures['no_adapter_same']}/{figures['controls']}")
    for r in rows:
        print(f"  {r['stage']:<7} {r['prompt'][:28]:<28} prompt {'same' if r['prompt_same'] else 'DIFFERS'}, "
              f"answer {'same' if r['persllm'] == r['llama_server'] else 'differs'} ({r['agree']})")
        print(f"          persllm:      {r['persllm'][:90]!r}")
        print(f"          llama-server: {r['llama_server'][:90]!r}")
        print(f"          other adapter:{r['other_adapter'][:90]!r}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"run": str(run), "figures": figures, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
