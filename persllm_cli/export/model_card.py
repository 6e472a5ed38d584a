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


def render(info: runs.RunInfo, fmt: str, default_stage: str, facts: dict[str, Any], figures: dict[str, Any],
           use: list[str]) -> str:
    """The card of a `fmt` export; `use` is its "Use" section (the format's entry in formats.py)."""
    persona = info.data.get("persona", "the persona")
    if info.stage_runs:
        made = (f"{info.base} with one LoRA adapter ({info.data.get('method', 'sft')}) per stage "
                "(`persllm train --adapter-per-stage`), each in a LoRA GGUF of its own beside the base GGUF, which "
                "holds every stage's time token. Each conversation starts with a time token that puts the persona "
                "at a stage of life, and is answered with that stage's adapter applied.")
    else:
        made = (f"{info.base} with a LoRA adapter ({info.data.get('method', 'sft')}) merged in. Each conversation "
                "starts with a time token that puts the persona at a stage of life.")
    lines = [f"# {persona} (persllm export, {fmt})", "", f"A persona model of {persona} made with persllm: {made}", ""]
    if info.trained_stage is not None:
        lines += [f"This is stage {info.trained_stage}'s own model (`persllm train --adapter-per-stage`): its "
                  "adapter learned that stage's examples alone, so it speaks for that stage only.", ""]
    lines += ["| stage | label | token |", "|---|---|---|"]
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
        against = (("each stage's run" if info.stage_runs else "the run")
                   + (" with its weights rounded alike" if "vs_float32" in figures or "rounded" in figures else ""))
        lines.append(f"- Export check ({figures['format']}, greedy, vs {against}): {figures['identical']}/{figures['answers']} "
                     f"identical answers, token agreement {figures['agreement']:.1%}, largest logit difference "
                     f"{figures['max_logit_diff']:.2e}"
                     + (" (the other stages' time tokens left out)" if info.stage_runs else ""))
        if "vs_float32" in figures:
            f32 = figures["vs_float32"]
            lines.append(f"- Against the run as trained (float32): {f32['identical']}/{f32['answers']} identical answers, "
                         f"token agreement {f32['agreement']:.1%}, largest logit difference {f32['max_logit_diff']:.2e}")
    lines += _eval_lines(info)
    lines += ["", "## Use", ""] + use
    return "\n".join(lines) + "\n"
