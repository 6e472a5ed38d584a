"""The exported model's README.md: persona, stages and their tokens, base, training data, eval
figures when the run has them, the export check's figures, and how to use it elsewhere."""

from __future__ import annotations

import json
from typing import Any

from persllm_cli.model import runs


def _eval_lines(info: runs.RunInfo) -> list[str]:
    path = info.path / "eval" / "eval.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    lines = ["", "## Evaluation (`persllm eval`)", "", "```json", json.dumps(data, indent=2, ensure_ascii=False)[:3000], "```"]
    return lines


def render(info: runs.RunInfo, fmt: str, default_stage: str, gguf_name: str, facts: dict[str, Any],
           figures: dict[str, Any]) -> str:
    persona = info.data.get("persona", "the persona")
    first = info.stages[0]["id"]
    lines = [f"# {persona} (persllm export, {fmt})", "",
             f"A persona model of {persona} made with persllm: {info.base} with a LoRA adapter "
             f"({info.data.get('method', 'sft')}) merged in. Each conversation starts with a time token that "
             "puts the persona at a stage of life.", "",
             "| stage | label | token |", "|---|---|---|"]
    for s in info.stages:
        mark = " (default)" if s["id"] == default_stage else ""
        lines.append(f"| {s['id']}{mark} | {s.get('label', '')} | `{s['token']}` |")
    lines += ["", f"- Base: {info.base} ({facts.get('architecture', '?')}, {facts.get('parameters', 0) / 1e6:.0f} M parameters)",
              f"- Vocabulary: {facts.get('vocab_size', '?')} tokens, the time tokens included"]
    data = info.data.get("data") or {}
    counts = {k: v for k, v in data.items() if isinstance(v, (int, float)) or (isinstance(v, dict) and "records" in v)}
    if counts:
        lines.append("- Training data: " + ", ".join(f"{k}: {v.get('records') if isinstance(v, dict) else v}" for k, v in counts.items()))
    elif data:
        lines.append("- Training data: " + json.dumps(data, ensure_ascii=False)[:500])
    if figures:
        against = "the run with its weights rounded alike" if "vs_float32" in figures else "the run"
        lines.append(f"- Export check ({figures['format']}, greedy, vs {against}): {figures['identical']}/{figures['answers']} "
                     f"identical answers, token agreement {figures['agreement']:.1%}, largest logit difference "
                     f"{figures['max_logit_diff']:.2e}")
        if "vs_float32" in figures:
            f32 = figures["vs_float32"]
            lines.append(f"- Against the run as trained (float32): {f32['identical']}/{f32['answers']} identical answers, "
                         f"token agreement {f32['agreement']:.1%}, largest logit difference {f32['max_logit_diff']:.2e}")
    lines += _eval_lines(info)
    lines += ["", "## Use", ""]
    if fmt == "hf":
        lines += ["transformers (the stage is a chat template variable; without it: the default stage):", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "tok = AutoTokenizer.from_pretrained(\".\")", "model = AutoModelForCausalLM.from_pretrained(\".\")",
                  "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Who are you?\"}],",
                  f"                              add_generation_prompt=True, stage=\"{first}\", return_tensors=\"pt\")",
                  "out = model.generate(**ids, max_new_tokens=128)",
                  "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", "",
                  "OpenAI-compatible servers (`vllm serve .` or `transformers serve`): pass the stage with",
                  f"`extra_body={{\"chat_template_kwargs\": {{\"stage\": \"{first}\"}}}}`.", "",
                  "llama.cpp: export with `persllm export --format gguf` and run `llama-cli -m FILE.gguf --jinja`."]
    else:
        lines += [f"llama.cpp: `llama-server -m {gguf_name} --jinja` and send",
                  f"`\"chat_template_kwargs\": {{\"stage\": \"{first}\"}}` with a chat request (default: {default_stage}).",
                  f"transformers: `AutoModelForCausalLM.from_pretrained(\".\", gguf_file=\"{gguf_name}\")`."]
        if fmt == "ollama":
            lines += ["", "Ollama: one Modelfile per stage:", "", "```"]
            lines += [f"ollama create {str(persona).lower().replace(' ', '-')}-{s['id']} -f Modelfile.{s['id']}" for s in info.stages]
            lines += ["```"]
    return "\n".join(lines) + "\n"
