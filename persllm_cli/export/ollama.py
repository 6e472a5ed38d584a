"""Ollama Modelfiles: one per stage, each FROM the exported GGUF with a Go TEMPLATE that renders the
training format with that stage's token where the run has it (first, or after each assistant
header), the stop parameters, and SYSTEM when the run has one; for a run with one adapter per
stage, ADAPTER names the stage's LoRA GGUF.

Ollama does not run the Jinja template inside the GGUF; its TEMPLATE is written here for ChatML
bases (SmolLM2, Qwen2) and for bases without a template (plain User:/Assistant: lines).
"""

from __future__ import annotations

import json
from typing import Any

from persllm_cli.core.errors import PersllmError
from persllm_cli.export.template import stop_strings


def _chatml_default_system(tokenizer: Any) -> str:
    """What the base's template writes when a conversation has no system message (SmolLM2 adds one)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    return text[: text.index("<|im_start|>user")]


def go_template(tokenizer: Any, token: str) -> str:
    from persllm_cli.model.chat_format import time_token_at

    template = getattr(tokenizer, "chat_template", None)
    at_answer = time_token_at(tokenizer) == "answer"   # after each assistant header, as in training
    if not template:
        return (token + '{{- range .Messages }}{{ if eq .Role "user" }}User{{ else if eq .Role "assistant" }}'
                'Assistant{{ else }}System{{ end }}: {{ .Content }}'
                '{{ if eq .Role "assistant" }}' + (tokenizer.eos_token or "") + '{{ end }}\n{{ end }}Assistant:')
    if "<|im_start|>" not in template:
        raise PersllmError("the Ollama export writes templates for ChatML bases (SmolLM2, Qwen2) and bases "
                           "without a chat template; use `--format gguf` with llama.cpp's Jinja templates instead")
    default = _chatml_default_system(tokenizer)
    opening = ""
    if default:
        opening = ('{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
                   + default + "{{ end }}")
    if at_answer:
        return (opening + "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ if eq .Role \"assistant\" }}" + token
                + "{{ end }}{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n" + token)
    return (token + opening + "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n")


def modelfile(gguf_name: str, tokenizer: Any, token: str, system: str | None, *, adapter: str | None = None) -> str:
    lines = [f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter}"] if adapter else [])
    lines.append(f'TEMPLATE """{go_template(tokenizer, token)}"""')
    for stop in stop_strings(tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
